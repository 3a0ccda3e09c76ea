"""Perplexity on fixed, non-overlapping windows, so float, RTN and AWQ models are compared on the same tokens."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from awqkit.calib.data import load_samples, tokenize_samples
from awqkit.errors import CalibrationError

DEFAULT_EVAL_TEXT = "builtin:python-docs-heldout"


def eval_windows(
    tokenizer: Any,
    source: Any = DEFAULT_EVAL_TEXT,
    seq_len: int = 512,
    max_windows: int = 64,
    split: str = "test",
    text_column: str = "text",
) -> torch.Tensor:
    """``[n, seq_len]`` windows of the source's tokens (documents joined by blank lines), first ``max_windows``."""
    samples = load_samples(source, split, text_column, tokenizer)
    if samples and isinstance(samples[0], str):
        ids = tokenizer("\n\n".join(s.strip() for s in samples))["input_ids"]
    else:
        ids = [t for s in tokenize_samples(samples, tokenizer) for t in s]
    n = min(len(ids) // seq_len, max_windows)
    if n == 0:
        raise CalibrationError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.inference_mode()
def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over every window (each scored independently)."""
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
