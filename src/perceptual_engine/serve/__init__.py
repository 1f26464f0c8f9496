"""Perceptual distances over HTTP on Ray Serve (the ``[serve]`` extra; docs/serve.md).

``Client`` needs only the standard library; the server's modules import Ray, FastAPI and
Starlette when they are used, never on ``import perceptual_engine``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Client", "ServeConfig", "Limits"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from .client import Client

        return Client
    if name in ("ServeConfig", "Limits"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
