"""The ``awqkit`` command line, every verb through the real CLI (``python -m awqkit`` in a subprocess)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.model_dirs import make_model_dir

# few, short calibration blocks: the tiny model quantizes in seconds
QUANT_ARGS = ["--max-calib-samples", "4", "--max-calib-seq-len", "64"]
EVAL_ARGS = ["--max-windows", "2", "--seq-len", "128"]


def awqkit(*args: object, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "awqkit", *map(str, args)], capture_output=True, text=True, input=input, timeout=timeout
    )


def start(*args: object, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "awqkit", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with status 1 and exactly one ``error:`` line, no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def quantized(model_dir, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One uninterrupted quantization with --resume and --report: (checkpoint, report dir, the finished run)."""
    root = tmp_path_factory.mktemp("quantized")
    out, report = root / "tiny-awq", root / "report"
    result = awqkit("quantize", model_dir, "-o", out, *QUANT_ARGS, "--resume", "--report", report)
    assert result.returncode == 0, result.stderr
    return out, report, result


def test_help_for_every_verb():
    top = awqkit("--help")
    assert top.returncode == 0
    verbs = ["quantize", "eval", "generate", "chat", "inspect", "serve", "bench"]
    for verb in verbs:
        assert verb in top.stdout
        result = awqkit(verb, "--help")
        assert result.returncode == 0, result.stderr
        assert f"usage: awqkit {verb}" in result.stdout


def test_quantize_writes_checkpoint_tokenizer_and_summary(quantized):
    out, _, result = quantized
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg == {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": 128,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    assert not out.with_name(out.name + ".awqkit-progress").exists()  # removed after a successful save
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert "peak memory" in result.stdout and "round-to-nearest → AWQ" in result.stdout
    assert len(re.findall(r"^ +layer +\d+ .*→", result.stdout, re.MULTILINE)) == 3  # error before/after per layer
    assert "AWQ:" in result.stderr  # the tqdm progress bar over layers


def test_report_json_and_plot(quantized):
    _, report_dir, _ = quantized
    report = json.loads((report_dir / "report.json").read_text())
    assert len(report["layers"]) == 3
    for layer in report["layers"]:
        assert set(layer["layer_mse"]) == {"rtn", "awq"}
        searched = [g for g in layer["groups"] if "alpha" in g]
        assert searched and all(0 <= g["alpha"] < 1 and g["awq_mse"] <= g["rtn_mse"] for g in searched)
        assert layer["clip"]  # shrink ratio per clipped Linear
    totals = report["totals"]
    assert totals["layers"] == 3 and totals["total_seconds"] > 0 and totals["peak_rss_gb"] > 0
    assert totals["layer_mse_awq_mean"] < totals["layer_mse_rtn_mean"]
    png = (report_dir / "layer_error.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def _kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "quantization never got there"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def _next_layer(progress: Path) -> int:
    try:
        return json.loads((progress / "progress.json").read_text())["next_layer"]
    except (OSError, ValueError):
        return 0


def _resume_and_compare(model_dir: Path, out: Path, reference: Path) -> None:
    progress = out.with_name(out.name + ".awqkit-progress")
    assert not out.exists() and progress.is_dir()
    result = awqkit("quantize", model_dir, "-o", out, *QUANT_ARGS, "--resume", "--quiet")
    assert result.returncode == 0, result.stderr
    assert files_of(out) == files_of(reference)
    assert not progress.exists()


def test_resume_after_kill_gives_identical_checkpoint(model_dir, quantized, tmp_path):
    reference, _, _ = quantized
    out = tmp_path / "tiny-awq"
    progress = tmp_path / "tiny-awq.awqkit-progress"
    proc = start("quantize", model_dir, "-o", out, *QUANT_ARGS, "--resume", "--quiet")
    _kill_when(proc, lambda: _next_layer(progress) >= 1)  # layer 0 saved, layers 1 and 2 not (a wider window)
    # without --resume the leftover progress is not silently thrown away
    assert "--resume" in one_error_line(awqkit("quantize", model_dir, "-o", out, *QUANT_ARGS))
    _resume_and_compare(model_dir, out, reference)


def test_ctrl_c_during_quantize_leaves_no_checkpoint(tmp_path):
    # deep enough that the layer loop is still running when the signal lands (the 3-layer model finishes too soon)
    deep = make_model_dir(tmp_path / "models" / "deep-llama", num_hidden_layers=48)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "tiny-awq"
    proc = start(
        "quantize", deep, "-o", out, "--max-calib-samples", "16", "--max-calib-seq-len", "128",
        # a shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it: restore the default
        # so the test holds however the suite was launched (e.g. `nohup make test &`)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while "AWQ:" not in "".join(seen):  # the layer loop has started
        assert proc.poll() is None, "".join(seen)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    reader.join(timeout=10)
    assert "interrupted" in "".join(seen)
    assert list(work.iterdir()) == []  # no OUT, no temporary directory


def test_eval_float_rtn_and_awq_on_the_same_windows(model_dir, quantized):
    out, _, _ = quantized
    runs = {
        "float": awqkit("eval", model_dir, *EVAL_ARGS, "--json"),
        "rtn": awqkit("eval", model_dir, *EVAL_ARGS, "--rtn", "--group-size", "64", "--json"),
        "awq": awqkit("eval", out, *EVAL_ARGS, "--json"),
    }
    results = {}
    for kind, run in runs.items():
        assert run.returncode == 0, run.stderr
        results[kind] = json.loads(run.stdout)
        assert results[kind]["kind"] == kind
        assert (results[kind]["windows"], results[kind]["seq_len"]) == (2, 128)
        assert results[kind]["text"] == "builtin:python-docs-heldout"
        assert 1 < results[kind]["perplexity"] < 1e4
    assert results["rtn"]["group_size"] == 64 and results["awq"]["group_size"] == 128
    # 4-bit weights move the perplexity of a random model a little, never wildly
    assert abs(results["awq"]["perplexity"] / results["float"]["perplexity"] - 1) < 0.2


def test_eval_text_file_and_errors(model_dir, quantized, tmp_path):
    out, _, _ = quantized
    text = tmp_path / "held-out.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))
    result = awqkit("eval", model_dir, "--text", text, *EVAL_ARGS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("perplexity ") and f"2 windows × 128 tokens of {text}" in result.stdout
    assert "already an AWQ checkpoint" in one_error_line(awqkit("eval", out, "--rtn", *EVAL_ARGS))
    assert "no text file" in one_error_line(awqkit("eval", model_dir, "--text", tmp_path / "missing.txt"))


def test_generate_streams_and_is_reproducible(quantized):
    out, _, _ = quantized
    args = ("generate", out, "--prompt", "What is a list?", "--max-new-tokens", "12", "--seed", "7")
    first, second = awqkit(*args), awqkit(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_chat_keeps_history_until_exit(quantized):
    out, _, _ = quantized
    result = awqkit(
        "chat", out, "--max-new-tokens", "6", "--seed", "1", input="hello\nand a second question\n/exit\nnever read\n"
    )
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip()]) >= 1  # streamed replies, then /exit


def test_inspect_valid_checkpoint(quantized):
    out, _, _ = quantized
    result = awqkit("inspect", out)
    assert result.returncode == 0, result.stderr
    assert "valid AWQ checkpoint" in result.stdout and "group size 128" in result.stdout
    assert "21 AWQ Linears" in result.stdout  # 3 layers × 7
    autoawq = Path(__file__).parent / "fixtures" / "autoawq-tiny-llama-g64"  # written by AutoAWQ itself
    summary = json.loads(awqkit("inspect", autoawq, "--json").stdout)
    assert (summary["bits"], summary["group_size"], summary["zero_point"]) == (4, 64, True)
    assert summary["quantized_modules"] == 14 and not summary["has_tokenizer"]


def test_inspect_names_the_broken_file(quantized, model_dir, tmp_path):
    out, _, _ = quantized
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert str(weights) in one_error_line(awqkit("inspect", broken))
    assert "no quantization_config" in one_error_line(awqkit("inspect", model_dir))


def test_errors_are_one_line_and_debug_shows_traceback(model_dir, tmp_path):
    assert "no model at" in one_error_line(awqkit("quantize", tmp_path / "missing", "-o", tmp_path / "out"))
    assert "not supported" in one_error_line(awqkit("quantize", model_dir, "-o", tmp_path / "o", "--w-bit", "3"))
    debug = awqkit("--debug", "inspect", tmp_path / "missing")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "error: " in debug.stderr


def test_group_size_mismatch(tmp_path):
    odd = make_model_dir(
        tmp_path / "hidden96",
        hidden_size=96,
        intermediate_size=192,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
    )
    line = one_error_line(awqkit("quantize", odd, "-o", tmp_path / "out", "--group-size", "128", *QUANT_ARGS))
    assert "group size 128 does not divide in_features 96" in line and "32" in line and "--group-size" in line
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(model_dir, quantized):
    out, _, _ = quantized
    assert "--overwrite" in one_error_line(awqkit("quantize", model_dir, "-o", out, *QUANT_ARGS))


def test_serve_starts_and_stops(quantized):
    out, _, _ = quantized
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start("serve", out, "--port", port, "--max-num-seqs", "1", "--shutdown-grace", "1")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    models = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "server never answered"
                time.sleep(0.3)
        assert models["data"][0]["id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0


def test_bench_lists_and_runs_scripts():
    listing = awqkit("bench")
    assert listing.returncode == 0, listing.stderr
    assert "kernels" in listing.stdout and "quantize_smollm2" in listing.stdout
    passthrough = awqkit("bench", "quantize_sm", "--help")  # a unique prefix; options go to the script
    assert passthrough.returncode == 0 and "--group-size" in passthrough.stdout
    assert "no single benchmark" in one_error_line(awqkit("bench", "no-such-benchmark"))


@pytest.mark.usefixtures("smollm_source")
def test_embedded_default_when_model_is_omitted(tmp_path):
    # SmolLM2's hidden size 576 is no multiple of 128: a friendly error naming what works, before any calibration
    line = one_error_line(awqkit("quantize", "-o", tmp_path / "out", "--group-size", "128"))
    assert "576" in line and "64" in line and "--group-size" in line
    assert not (tmp_path / "out").exists()
