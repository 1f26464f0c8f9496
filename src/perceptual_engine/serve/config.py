"""What a server runs with (ServeConfig, Limits) and the checks made before Ray starts:
the model's kind, the bind address and its token, the numbers."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import Any

from .. import kinds
from ..errors import ConfigError

# Pillow format names an upload may have; the others are refused before any decoder runs.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
INSTALL = "pip install 'perceptual-engine[serve]'"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on one request.

    max_body_bytes: the request body (every file of a form together); larger is 413.
    max_pixels: per image, read from the header before decoding (decompression bombs).
    max_pairs: pairs in one /v1/distance/batch request.
    formats: the Pillow formats accepted (``FORMATS``).
    max_held_pixels: pixels of decoded images one replica holds at once (decoding, waiting
        for the engine, in the engine), 12 bytes each as float32 RGB; a pair waits for room,
        so many large images in one batch request or in concurrent ones cannot exhaust
        memory. At least two images of ``max_pixels`` (one pair at the limit).
    """

    max_body_bytes: int = 32 << 20
    max_pixels: int = 4096 * 4096
    max_pairs: int = 64
    formats: tuple[str, ...] = FORMATS
    max_held_pixels: int = 4 * 4096 * 4096

    def __post_init__(self) -> None:
        if self.max_held_pixels < 2 * self.max_pixels:
            raise ConfigError(f"max_held_pixels {self.max_held_pixels} is below one pair of max_pixels "
                              f"images ({2 * self.max_pixels}); accepted: at least 2 x max_pixels.")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """One server: the model, where it listens, how it batches and scales.

    max_batch: pairs per engine call at most (also bounded by the memory budget).
    batch_wait_ms: how long a free engine waits for more requests before it runs a
        batch that is not full; 0 runs at once (requests that arrive while the engine is
        busy still make the next batch).
    max_queued: requests waiting at the proxy beyond what the replicas hold; more get 503
        with Retry-After (Ray Serve's ``max_queued_requests``).
    token: the bearer token every request must carry, or None (loopback, or insecure).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    precision: str = "auto"
    max_batch: int = 16
    batch_wait_ms: float = 0.0
    replicas: int = 1
    ray_address: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)
    insecure: bool = False
    max_queued: int = 64
    memory_budget: Any = None
    request_timeout_s: float = 60.0
    limits: Limits = Limits()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace dropped); ConfigError if unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path!r} cannot be read ({exc}); give a readable text file "
                          "holding one token.") from None
    if len(token) < 16:
        raise ConfigError(f"token file {path!r} holds {len(token)} character(s); accepted: a token "
                          "of 16 characters or more, e.g. from `python -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))'`.")
    return token


def check(config: ServeConfig):
    """ConfigError for anything that would fail after Ray starts; returns the ModelInfo."""
    from ..runtime import read_info

    if not is_loopback(config.host) and config.token is None and not config.insecure:
        raise ConfigError(f"--host {config.host} is not a loopback address: anyone who reaches it "
                          "could use the server. Add --token-file FILE (every request then needs "
                          "'Authorization: Bearer TOKEN'), or --insecure on a network you trust.")
    for name in ("max_batch", "replicas", "max_queued"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)} is not accepted; accepted: >= 1.")
    if not 0 <= config.batch_wait_ms <= 1000:
        raise ConfigError(f"batch_wait_ms={config.batch_wait_ms} is not accepted; accepted: 0 to 1000.")
    if not 0 < config.port < 65536:
        raise ConfigError(f"port {config.port} is not accepted; accepted: 1 to 65535.")
    if not os.path.isfile(config.model):
        raise ConfigError(f"model {config.model!r} does not exist; give an ONNX file from "
                          "`perceptual-engine export --graph " + "|".join(kinds.names(compares=True)) + "`.")
    info = read_info(config.model)
    if not kinds.get(info.graph).compares:
        raise ConfigError(f"{config.model!r} is a {info.graph} graph; serve needs a model that compares "
                          "two images: `perceptual-engine export --graph "
                          + "|".join(kinds.names(compares=True)) + "`.")
    return info


def import_serve():
    """ray.serve, or ConfigError saying how to install it."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (Starlette's form parser)
        from ray import serve
    except ImportError as exc:
        raise ConfigError(f"Ray Serve is not installed ({exc}); the server needs it: {INSTALL}.") from exc
    return serve
