"""Wall time and peak memory of AWQ quantization on a model of a given shape with random weights.

Speed does not depend on the weights' values, so this needs no model hub: it is how the GPU figure is measured
(the embedded default's GGUF file is too large to carry to the GPU machine). Calibration: 128 x 512 random tokens.

    python benchmarks/quantize_speed.py --shape smollm2-135m --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from awqkit import AutoAWQForCausalLM

SHAPES = {
    # SmolLM2-135M-Instruct's config (Llama architecture)
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    # Qwen2.5-1.5B's config
    "qwen2-1.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    data = torch.randint(0, config.vocab_size, (args.samples, args.seq_len)).tolist()
    awq = AutoAWQForCausalLM(model, device=torch.device(args.device))
    t0 = time.perf_counter()
    awq.quantize(
        None,
        {"q_group_size": args.group_size},
        calib_data=data,
        max_calib_seq_len=args.seq_len,
        max_calib_samples=args.samples,
    )
    seconds = time.perf_counter() - t0
    dev = torch.device(args.device)
    result = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "calibration_tokens": args.samples * args.seq_len,
        "group_size": args.group_size,
        "quantize_seconds": seconds,
        "peak_rss_gb": awq.report["peak_rss_gb"],
        "peak_gpu_gb": awq.report["peak_gpu_gb"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quantize_speed_{args.shape}_{dev.type}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
