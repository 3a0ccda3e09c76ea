"""OpenAI-compatible HTTP server on the awqkit engine, with continuous batching.

``create_app(engine, ...)`` builds the FastAPI app (:mod:`awqkit.server.app`); ``serve(checkpoint, ...)`` loads a
checkpoint and runs it under uvicorn until SIGTERM/SIGINT (:mod:`awqkit.server.serve`). ``awqkit serve`` and
``python -m awqkit.server`` call :func:`serve`. FastAPI, uvicorn and prometheus_client are imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["create_app", "serve"]


def create_app(
    engine: Any,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    default_max_tokens: int | None = None,
    shutdown_grace_s: float = 30.0,
) -> FastAPI:
    """Build the app around a loaded engine; see :func:`awqkit.server.app.create_app`."""
    from awqkit.server.app import create_app as _create_app

    return _create_app(
        engine,
        served_model_name=served_model_name,
        api_key=api_key,
        max_queue=max_queue,
        default_max_tokens=default_max_tokens,
        shutdown_grace_s=shutdown_grace_s,
    )


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
    **options: Any,
) -> None:
    """Load ``checkpoint`` and serve it until SIGTERM/SIGINT; see :func:`awqkit.server.serve.serve`."""
    from awqkit.server.serve import serve as _serve

    _serve(
        checkpoint,
        host=host,
        port=port,
        api_key=api_key,
        served_model_name=served_model_name,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        device=device,
        dtype=dtype,
        **options,
    )
