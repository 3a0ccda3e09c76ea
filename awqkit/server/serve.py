"""Run the app under uvicorn: load the checkpoint, serve, and shut down gracefully.

On SIGTERM or SIGINT the server stops accepting connections and new requests (503), lets the requests in flight
finish for up to ``shutdown_grace_s`` seconds, then aborts what is left — streams still end with a final chunk and
``data: [DONE]`` — and the process exits with status 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

log = logging.getLogger("awqkit.server")


def serve(
    checkpoint: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    *,
    max_queue: int = 256,
    default_max_tokens: int | None = None,
    shutdown_grace_s: float = 30.0,
    log_level: str = "info",
    cpu_threads: int | None = None,
) -> None:
    """Load ``checkpoint`` into an :class:`awqkit.engine.Engine` and serve the OpenAI API on ``host:port``.

    Blocks until SIGTERM/SIGINT, then shuts down gracefully (see the module docstring). Raises the engine's
    :class:`~awqkit.errors.AwqkitError` subclasses when the checkpoint cannot be loaded. ``cpu_threads`` sets
    PyTorch's intra-op threads (CPU serving on a machine shared with other work runs much faster with fewer threads
    than cores: OpenMP threads that wait on each other for a core are slower than one thread).
    """
    if checkpoint is None:
        from awqkit.errors import ConfigError

        raise ConfigError(
            "no checkpoint given: pass an AWQ checkpoint directory (make one from the embedded default with "
            "`awqkit quantize -o DIR`, then `awqkit serve DIR`)"
        )
    import uvicorn

    from awqkit.engine import Engine
    from awqkit.server.app import create_app

    if cpu_threads is not None:
        import torch

        if cpu_threads < 1:
            from awqkit.errors import ConfigError

            raise ConfigError(f"--cpu-threads must be at least 1, got {cpu_threads}")
        torch.set_num_threads(cpu_threads)

    # The engine thread and the event loop share the interpreter: hand the GIL over every 1 ms instead of 5 ms, so
    # neither waits long for the other (the engine spends most of a step outside Python anyway).
    sys.setswitchinterval(0.001)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    engine = Engine.from_checkpoint(
        checkpoint, device=device, dtype=torch_dtype(dtype), max_num_seqs=max_num_seqs, max_model_len=max_model_len
    )
    app = create_app(
        engine,
        served_model_name=served_model_name,
        api_key=api_key,
        max_queue=max_queue,
        default_max_tokens=default_max_tokens,
        shutdown_grace_s=shutdown_grace_s,
    )
    state = app.state.awqkit
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    log.info(
        "serving '%s' on http://%s:%d/v1 (max_num_seqs=%d, max_model_len=%d)",
        state.model_name,
        host,
        port,
        int(engine.max_num_seqs),
        int(engine.max_model_len),
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(shutdown_grace_s) + 5,
        timeout_keep_alive=5,
    )
    server = _graceful_server(config, on_first_signal=lambda: state.scheduler.drain(shutdown_grace_s))
    _run_without_reraise(server)


def torch_dtype(dtype: Any) -> Any:
    """A dtype name (``bfloat16``/``bf16``, ``float16``/``fp16``, ``float32``/``fp32``) → torch dtype; others pass."""
    if dtype is None or not isinstance(dtype, str):
        return dtype
    import torch

    from awqkit.errors import ConfigError

    names = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "auto": None,
    }
    key = dtype.lower().removeprefix("torch.")
    if key not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    return names[key]


def _graceful_server(config: Any, on_first_signal: Any) -> Any:
    """A uvicorn server that calls ``on_first_signal`` (start draining) on the first SIGTERM/SIGINT."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, telling the scheduler to drain on the first exit signal."""

        def __init__(self, config: Any, on_first_signal: Any) -> None:
            super().__init__(config)
            self._on_first_signal = on_first_signal

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                self._on_first_signal()
            super().handle_exit(sig, frame)

    return GracefulServer(config, on_first_signal)


def _run_without_reraise(server: Any) -> None:
    """Run uvicorn; afterwards it re-raises the signal that stopped it, which would kill us with SIGTERM's status.

    Installing no-op handlers first makes that re-raise harmless, so a graceful shutdown exits with status 0.
    """
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser(prog: str = "python -m awqkit.server") -> argparse.ArgumentParser:
    """The command line shared by ``python -m awqkit.server`` (``awqkit serve`` has the same options)."""
    p = argparse.ArgumentParser(prog=prog, description="Serve an AWQ checkpoint behind an OpenAI-compatible API.")
    p.add_argument("checkpoint", nargs="?", default=None, help="AWQ checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("AWQKIT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $AWQKIT_API_KEY)",
    )
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: checkpoint's)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded in one batch")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="activation dtype: float16, bfloat16 or float32")
    p.add_argument("--max-queue", type=int, default=256, help="sequences that may wait for a slot before 503")
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="completion budget for requests without max_tokens (default: the rest of the context)",
    )
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--cpu-threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's choice)")
    return p


def serve_from_args(args: argparse.Namespace) -> None:
    """Run :func:`serve` with the options of :func:`build_parser` (shared by ``awqkit serve`` and ``-m``)."""
    serve(
        args.checkpoint,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        device=args.device,
        dtype=args.dtype,
        max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens,
        shutdown_grace_s=args.shutdown_grace,
        log_level=args.log_level,
        cpu_threads=args.cpu_threads,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m awqkit.server``: parse, serve, print a one-line error on failure."""
    from awqkit.errors import AwqkitError

    args = build_parser().parse_args(argv)
    try:
        serve_from_args(args)
    except AwqkitError as exc:
        print(f"awqkit serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
