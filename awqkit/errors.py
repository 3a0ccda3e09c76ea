"""The exceptions users see.

Every error awqkit raises on purpose is an :class:`AwqkitError`. Its message says what is wrong *and* what to do,
so the CLI and the server can print it as one line instead of a stack trace.
"""

from __future__ import annotations


class AwqkitError(Exception):
    """Base class of every error awqkit raises deliberately."""


class ConfigError(AwqkitError, ValueError):
    """A quantization config, model config or argument is invalid."""


class GroupSizeError(ConfigError):
    """The group size does not divide a layer's input features."""


class UnsupportedArchitectureError(AwqkitError, ValueError):
    """The model's architecture has no AWQ declaration in :mod:`awqkit.arch`."""


class CalibrationError(AwqkitError, ValueError):
    """Calibration data is missing, empty, too short or unreadable."""


class NumericalError(AwqkitError, ArithmeticError):
    """NaN/Inf in weights or activations, or a fold that changed a layer's output."""


class CheckpointError(AwqkitError, OSError):
    """A checkpoint is missing, partial, corrupt or inconsistent."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """A model path or hub id could not be found."""


class DeviceMemoryError(AwqkitError, MemoryError):
    """The device ran out of memory; the message says which knob lowers the need."""
