"""OpenAI-compatible HTTP server on the awqkit engine, with continuous batching.

``create_app(engine, ...)`` builds the FastAPI app (:mod:`awqkit.server.app`); ``serve(checkpoint, ...)`` loads a
checkpoint and runs it under uvicorn until SIGTERM/SIGINT (:mod:`awqkit.server.serve`). ``awqkit serve`` and
``python -m awqkit.server`` call :func:`serve`. FastAPI, uvicorn and prometheus_client are imported only when used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    """Import lazily: ``import awqkit.server`` must not pull in FastAPI, uvicorn or the engine."""
    if name == "create_app":
        from awqkit.server.app import create_app

        return create_app
    if name == "serve":
        from awqkit.server.serve import serve

        return serve
    raise AttributeError(f"module 'awqkit.server' has no attribute {name!r}")
