"""Calibration data: any source → token blocks."""

from awqkit.calib.data import builtin_texts, calibration_blocks, load_samples, make_blocks, tokenize_samples

__all__ = ["builtin_texts", "calibration_blocks", "load_samples", "make_blocks", "tokenize_samples"]
