"""The quantization report: ``AutoAWQForCausalLM.report`` plus totals, as JSON, a PNG plot and a text summary.

``AutoAWQForCausalLM.quantize`` leaves ``.report``: per layer, each scale group's chosen α and its output MSE after
round-to-nearest and after AWQ, the clip search's shrink per Linear, the layer's output MSE against the float layer
(``layer_mse``: ``rtn`` = plain round-to-nearest of the float weights, ``awq`` = after scaling and clipping) and the
seconds it took. :func:`full_report` adds totals; :func:`write_report` writes ``report.json`` and ``layer_error.png``;
:func:`summary_lines` is what ``awqkit quantize`` prints at the end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _geomean(values: list[float]) -> float | None:
    positive = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in positive) / len(positive)) if positive else None


def totals(report: dict[str, Any]) -> dict[str, Any]:
    """Whole-model figures from a per-layer report: mean layer MSEs, how many layers AWQ improved, the time."""
    rtn = [layer["layer_mse"]["rtn"] for layer in report["layers"]]
    awq = [layer["layer_mse"]["awq"] for layer in report["layers"]]
    ratios = [a / r for a, r in zip(awq, rtn) if r > 0]
    return {
        "layers": len(rtn),
        "layer_mse_rtn_mean": sum(rtn) / len(rtn) if rtn else None,
        "layer_mse_awq_mean": sum(awq) / len(awq) if awq else None,
        "layer_mse_ratio_geomean": _geomean(ratios),  # < 1: AWQ's output is closer to the float layer's
        "layers_improved": sum(a < r for a, r in zip(awq, rtn)),
        "quantize_seconds": report.get("seconds"),
        "peak_rss_gb": report.get("peak_rss_gb"),
        "peak_gpu_gb": report.get("peak_gpu_gb"),
    }


def full_report(report: dict[str, Any], extra_totals: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The API's report plus ``totals`` (with ``extra_totals``, e.g. timings) and ``extra`` entries (source, output)."""
    return {**report, **extra, "totals": {**totals(report), **(extra_totals or {})}}


def plot_layer_error(report: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """A PNG of each layer's output MSE after round-to-nearest and after AWQ (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [layer["index"] for layer in report["layers"]]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        ax.plot(layers, [layer["layer_mse"]["rtn"] for layer in report["layers"]], "o-", label="round-to-nearest")
        ax.plot(layers, [layer["layer_mse"]["awq"] for layer in report["layers"]], "s-", label="AWQ")
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("output MSE vs float layer")
        qc = report.get("quant_config", {})
        ax.set_title(
            title
            or f"{report.get('model_type', 'model')}: {qc.get('bits', 4)}-bit, group size "
            f"{qc.get('group_size', '?')}{', zero point' if qc.get('zero_point') else ''}"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_report(report: dict[str, Any], directory: str | Path, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.json`` and ``layer_error.png`` into ``directory`` (created); returns both paths."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return json_path, plot_layer_error(report, directory / "layer_error.png", title)


def _duration(seconds: float) -> str:
    minutes, s = divmod(seconds, 60)
    return f"{int(minutes)}m{s:04.1f}s" if minutes else f"{s:.1f}s"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The end-of-run summary: settings, time, peak memory and per-layer error before/after (RTN → AWQ)."""
    t = report["totals"]
    qc, cal = report["quant_config"], report["calibration"]
    lines = [
        f"{report.get('source', 'model')} → {report.get('output', '?')}",
        f"  {qc['bits']}-bit, group size {qc['group_size']}, {'zero point' if qc['zero_point'] else 'symmetric'}; "
        f"{t['layers']} layers; calibration {cal['blocks']} × {cal['seq_len']} tokens on {report.get('device')}",
    ]
    timing = f"  time {_duration(t['total_seconds'])}" if t.get("total_seconds") is not None else "  time ?"
    parts = [
        f"{k} {_duration(t[f'{k}_seconds'])}" for k in ("load", "quantize", "save") if t.get(f"{k}_seconds") is not None
    ]
    memory = f"peak memory {t['peak_rss_gb']:.2f} GB RSS"
    if t.get("peak_gpu_gb") is not None:
        memory += f", {t['peak_gpu_gb']:.2f} GB GPU"
    lines.append(f"{timing} ({', '.join(parts)}); {memory}")
    lines.append("  layer output MSE vs float: round-to-nearest → AWQ")
    for layer in report["layers"]:
        r, a = layer["layer_mse"]["rtn"], layer["layer_mse"]["awq"]
        change = f"{(a / r - 1) * 100:+.0f}%" if r > 0 else ""
        lines.append(f"    layer {layer['index']:>3}  {r:.3e} → {a:.3e}  {change}")
    if t["layers"]:
        ratio = t["layer_mse_ratio_geomean"]
        lines.append(
            f"  mean {t['layer_mse_rtn_mean']:.3e} → {t['layer_mse_awq_mean']:.3e}; AWQ lower in "
            f"{t['layers_improved']}/{t['layers']} layers"
            + (f" (typical layer ×{ratio:.2f})" if ratio is not None else "")
        )
    return lines
