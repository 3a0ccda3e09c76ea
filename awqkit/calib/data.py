"""Calibration data → token blocks.

Accepted sources (``calib_data`` of :meth:`AutoAWQForCausalLM.quantize`):

* a list of strings (the guide's fine-tuning samples), or a list of token-id lists;
* a local ``.txt`` (one sample per blank-line-separated paragraph), ``.jsonl``/``.json`` or ``.parquet`` file
  (``text_column``; a ``messages`` column is rendered with the chat template);
* ``"builtin:python-docs"`` / ``"builtin:python-docs-heldout"`` — two disjoint parts of the English Python reference
  that ships with every CPython, so calibration and evaluation work offline;
* any other string: a Hugging Face dataset name (``"pileval"`` is AutoAWQ's default), loaded with ``datasets``.

Samples are tokenized, long ones cut into pieces (AutoAWQ drops samples longer than the block; we keep every
token), concatenated and split into blocks of ``seq_len`` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from awqkit.errors import CalibrationError

DATASET_ALIASES = {"pileval": ("mit-han-lab/pile-val-backup", "validation")}
BUILTIN_PREFIX = "builtin:"


def builtin_texts(name: str) -> list[str]:
    """Offline English text: the Python language reference topics, split into two disjoint parts (2/3 + 1/3)."""
    import pydoc_data.topics

    topics = [text.strip() for _, text in sorted(pydoc_data.topics.topics.items())]
    if name == "python-docs":
        return [t for i, t in enumerate(topics) if i % 3 != 2]
    if name == "python-docs-heldout":
        return [t for i, t in enumerate(topics) if i % 3 == 2]
    raise CalibrationError(f"unknown builtin text {name!r}; use builtin:python-docs or builtin:python-docs-heldout")


def _texts_from_rows(rows: list[dict[str, Any]], text_column: str, tokenizer: Any, where: str) -> list[str]:
    if not rows:
        return []
    if text_column in rows[0]:
        return [str(r[text_column]) for r in rows]
    if "messages" in rows[0] and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    raise CalibrationError(f"{where} has no column {text_column!r} (columns: {sorted(rows[0])}); pass text_column=")


def load_file(path: Path, text_column: str, tokenizer: Any = None) -> list[str]:
    """Samples from a local .txt, .jsonl/.json or .parquet file."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".md"):
            return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return _texts_from_rows(rows, text_column, tokenizer, str(path))
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data if isinstance(data, list) else data.get("data", [])
            if rows and isinstance(rows[0], str):
                return list(rows)
            return _texts_from_rows(rows, text_column, tokenizer, str(path))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return _texts_from_rows(pq.read_table(path).to_pylist(), text_column, tokenizer, str(path))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CalibrationError(f"could not read calibration file {path}: {e}") from None
    raise CalibrationError(f"calibration file {path} has an unknown type; use .txt, .jsonl, .json or .parquet")


def load_dataset_texts(name: str, split: str, text_column: str, limit: int) -> list[str]:
    """Samples from a Hugging Face dataset (needs the network or a local datasets cache)."""
    repo, default_split = DATASET_ALIASES.get(name, (name, split))
    split = default_split if name in DATASET_ALIASES else split
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, split=split)
    except Exception as e:  # offline, unknown name, ...: many exception types
        raise CalibrationError(
            f"could not load calibration dataset {name!r} ({type(e).__name__}); with no network pass your own data: "
            "calib_data=[list of strings], a local .txt/.jsonl/.parquet path, or 'builtin:python-docs'"
        ) from None
    if text_column not in ds.column_names:
        raise CalibrationError(f"dataset {name!r} has no column {text_column!r} (columns: {ds.column_names})")
    return [str(t) for t in ds.select(range(min(limit, len(ds))))[text_column]]


def load_samples(
    calib_data: Any, split: str = "train", text_column: str = "text", tokenizer: Any = None, limit: int = 100_000
) -> list[str] | list[list[int]]:
    """Resolve ``calib_data`` into a list of texts or token-id lists."""
    if isinstance(calib_data, (list, tuple)):
        if not calib_data:
            raise CalibrationError("calib_data is an empty list; pass at least one text sample")
        if all(isinstance(s, str) for s in calib_data):
            return list(calib_data)
        if all(isinstance(s, (list, tuple)) and all(isinstance(t, int) for t in s) for s in calib_data):
            return [list(s) for s in calib_data]
        raise CalibrationError("calib_data must be a list of strings or a list of token-id lists")
    if not isinstance(calib_data, str):
        raise CalibrationError(f"calib_data of type {type(calib_data).__name__} is not supported")
    if calib_data.startswith(BUILTIN_PREFIX):
        return builtin_texts(calib_data[len(BUILTIN_PREFIX) :])
    path = Path(calib_data).expanduser()
    if path.is_file():
        return load_file(path, text_column, tokenizer)
    if path.suffix.lower() in (".txt", ".jsonl", ".json", ".parquet", ".md"):
        raise CalibrationError(f"calibration file {path} does not exist")
    return load_dataset_texts(calib_data, split, text_column, limit)


def tokenize_samples(samples: list[str] | list[list[int]], tokenizer: Any) -> list[list[int]]:
    """Token ids of every sample (texts through ``tokenizer``; id lists as given)."""
    if samples and isinstance(samples[0], list):
        return samples  # type: ignore[return-value]
    if tokenizer is None:
        raise CalibrationError("text calibration data needs a tokenizer")
    return [tokenizer(s.strip())["input_ids"] for s in samples if s.strip()]


def make_blocks(token_lists: list[list[int]], seq_len: int, max_blocks: int) -> torch.Tensor:
    """Concatenate every sample's tokens and cut into ``[n, seq_len]`` blocks (at most ``max_blocks``).

    Nothing is dropped for being long; only the tail shorter than one block is left over.
    """
    if seq_len < 1 or max_blocks < 1:
        raise CalibrationError("max_calib_seq_len and max_calib_samples must be at least 1")
    flat = [t for ids in token_lists for t in ids]
    n = min(len(flat) // seq_len, max_blocks)
    if n == 0:
        raise CalibrationError(
            f"calibration data has {len(flat)} tokens, fewer than one block of max_calib_seq_len={seq_len}; "
            "pass more text or a smaller max_calib_seq_len"
        )
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration_blocks(
    calib_data: Any,
    tokenizer: Any,
    max_calib_samples: int = 128,
    max_calib_seq_len: int = 512,
    split: str = "train",
    text_column: str = "text",
) -> torch.Tensor:
    """The whole stage: source → samples → tokens → blocks ``[n, max_calib_seq_len]`` (int64)."""
    samples = load_samples(calib_data, split, text_column, tokenizer)
    return make_blocks(tokenize_samples(samples, tokenizer), max_calib_seq_len, max_calib_samples)
