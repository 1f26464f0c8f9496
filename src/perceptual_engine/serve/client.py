"""A client of ``perceptual-engine serve``, on the standard library only (urllib).

Images go as files: a path's bytes unchanged (the server decodes them as load_image
does), a PIL image or an array encoded as lossless PNG. Float arrays are quantized to
8 bits on the way, as saving them to an image file would.
"""
from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Sequence

from ..errors import PerceptualError


class ServerError(PerceptualError):
    """The server refused a request or failed: ``status`` is the HTTP status (0: no answer),
    the message the server's ``error``; ``retry_after`` its Retry-After in seconds, if any."""

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class Client:
    """``Client("http://127.0.0.1:8000").distance(a, b)`` -> {"total", "terms", "model", "ms"}.

    a, b: a path, the bytes of an image file, a PIL image, or an array: uint8 (H, W, 3) or
    (H, W), float (3, H, W) / (1, 3, H, W) in [0, 1]. token: the server's bearer token.
    timeout: seconds per request. retries: how often a 503 (overload, a replica restarting)
    is retried after its Retry-After.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 60.0, retries: int = 2) -> None:
        self.url = url.rstrip("/")
        self.token, self.timeout, self.retries = token, timeout, retries

    def distance(self, a: Any, b: Any) -> dict[str, Any]:
        return self._post("/v1/distance", [("a", *_file(a, "a")), ("b", *_file(b, "b"))])

    def distance_batch(self, pairs: Sequence[tuple[Any, Any]]) -> dict[str, Any]:
        """Many pairs in one request: {"pairs": [{"total", "terms"} or {"error", "status"}], ...}."""
        fields = []
        for i, (a, b) in enumerate(pairs):
            fields += [("a", *_file(a, f"a{i}")), ("b", *_file(b, f"b{i}"))]
        return self._post("/v1/distance/batch", fields)

    def model(self) -> dict[str, Any]:
        return self._request("GET", "/v1/model")

    def healthy(self) -> bool:
        try:
            return self._request("GET", "/healthz").get("status") == "ready"
        except ServerError:
            return False

    # -- HTTP -------------------------------------------------------------------------
    def _post(self, path: str, fields: list[tuple[str, str, bytes]]) -> dict[str, Any]:
        boundary = uuid.uuid4().hex
        body = bytearray()
        for name, filename, data in fields:
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                     f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
            body += data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        return self._request("POST", path, bytes(body), f"multipart/form-data; boundary={boundary}")

    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> dict:
        headers = {"Content-Type": ctype} if ctype else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                err = _server_error(exc)
            except (urllib.error.URLError, OSError) as exc:
                raise ServerError(f"no answer from {self.url}{path} ({exc}); is the server running?", 0) from None
            if err.status != 503 or attempt == self.retries:
                raise err
            time.sleep(min(err.retry_after or 1.0, 10.0))
        raise AssertionError("unreachable")


def _server_error(exc: "urllib.error.HTTPError") -> ServerError:
    raw = exc.read()
    try:
        message = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace").strip() or exc.reason
    retry = exc.headers.get("Retry-After")
    return ServerError(f"{exc.code}: {message}", exc.code,
                       float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)


def _file(image: Any, name: str) -> tuple[str, bytes]:
    """(file name, bytes) of one image argument."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as fh:
            return os.path.basename(os.fspath(image)), fh.read()
    if isinstance(image, (bytes, bytearray)):
        return name, bytes(image)
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = _array_image(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return f"{name}.png", buf.getvalue()


def _array_image(arr: Any):
    import numpy as np
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise PerceptualError("a float array must hold values in [0, 1]; scale it (an array in "
                                  "[-1, 1]: (x + 1) / 2).")
        a = np.round(a * 255).astype(np.uint8)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise PerceptualError(f"an array of shape {np.asarray(arr).shape} is not an image; accepted: "
                              "(H, W), (H, W, 3), (3, H, W) or (1, 3, H, W).")
    return Image.fromarray(a)
