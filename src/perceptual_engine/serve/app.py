"""The HTTP API on Ray Serve: one deployment whose replicas each hold an Engine and a
Batcher, with a FastAPI ingress (docs/serve.md).

Routes: POST /v1/distance, POST /v1/distance/batch, GET /v1/model, GET /healthz,
GET /metrics. Every error is JSON ``{"error": ...}``: 4xx for the client's mistakes,
5xx for the server's; the replica stays up after any request.
"""
import asyncio
import hmac
import json
import os
import time
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import MemoryBudgetError, OutOfMemoryError, PerceptualError, first_line
from .config import ServeConfig
from .uploads import RequestError, decode_pair, header_pixels

api = FastAPI(title="perceptual-engine", docs_url=None, redoc_url=None, openapi_url=None)
# Warnings and errors only, and no access log line per request (the metrics count them).
LOGGING = {"log_level": "WARNING", "enable_access_log": False}
ROUTES = ("/v1/distance", "/v1/distance/batch", "/v1/model", "/healthz", "/metrics")


def _state() -> dict[str, Any]:
    """This replica's token and metrics. Ray Serve ships the FastAPI app to the replica by
    value (cloudpickle), so a global of this module seen by the middleware would be a copy:
    the state lives in a module imported where it runs."""
    import perceptual_engine.serve.metrics as m

    return m.REPLICA


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def error_response(message: str, status: int, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, MemoryBudgetError):
        return 413  # the pair is larger than this server computes
    if isinstance(exc, OutOfMemoryError):
        return 503
    if isinstance(exc, PerceptualError):
        return 400
    return 500


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        message = (f"no route {request.url.path!r}; accepted: POST /v1/distance, POST "
                   "/v1/distance/batch, GET /v1/model, GET /healthz, GET /metrics.")
    elif exc.status_code == 405:
        message = f"{request.method} is not accepted on {request.url.path!r}; see docs/serve.md."
    else:
        message = f"{str(exc.detail).rstrip('.')}; send a multipart/form-data body with image files a and b."
    return error_response(message, exc.status_code, getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(f"the request does not fit {request.url.path!r} ({first_line(exc)}); see "
                          "docs/serve.md.", 400)


@api.exception_handler(PerceptualError)
async def _library_error(request: Request, exc: PerceptualError) -> Response:
    return error_response(str(exc).strip().splitlines()[0], _status_of(exc))


@api.middleware("http")
async def _guard(request: Request, call_next) -> Response:
    """Token check, the error of last resort, and the metrics of every request."""
    start = time.perf_counter()
    route = request.url.path if request.url.path in ROUTES else "other"
    state = _state()
    token = state.get("token")
    if token is not None and not _authorized(request, token):
        response = error_response("missing or wrong token; send the header 'Authorization: Bearer "
                                  "TOKEN' with the token of the server's --token-file.", 401,
                                  {"WWW-Authenticate": "Bearer"})
    else:
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 JSON; the replica stays up
            response = error_response(f"internal error ({first_line(exc)}); please report it.", 500)
    metrics = state.get("metrics")
    if metrics is not None:
        metrics.observe(route, response.status_code, time.perf_counter() - start)
    return response


def _authorized(request: Request, token: str) -> bool:
    got = request.headers.get("authorization", "")
    scheme, _, value = got.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


async def read_form(request: Request, limit: int, max_files: int):
    """The multipart form of ``request``, its body read up to ``limit`` bytes (413 beyond)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise RequestError(f"content type {ctype or 'none'!r} is not accepted; accepted: "
                           "multipart/form-data with image files a and b (curl -F a=@x.png -F b=@y.png).", 415)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(f"the body is {int(length)} bytes; accepted: at most {limit}. Send smaller "
                           "images (or fewer pairs per batch request).", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the body exceeds {limit} bytes; send smaller images (or fewer pairs "
                               "per batch request).", 413)
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    return await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files + 8,
                                                     max_part_size=limit)


async def _files(form, field: str) -> list[tuple[bytes, str]]:
    out = []
    for item in form.getlist(field):
        if isinstance(item, str):
            raise RequestError(f"field {field!r} is text; accepted: an image file (curl -F {field}=@photo.png).")
        out.append((await item.read(), item.filename or field))
    return out


@serve.deployment(name="perceptual-engine", health_check_period_s=2, health_check_timeout_s=20,
                  graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=30)
@serve.ingress(api)
class DistanceServer:
    """One replica: the Engine, its Batcher, the model's description."""

    def __init__(self, config: ServeConfig) -> None:
        from .._io import sha256_file
        from ..datasets.runner import row_terms
        from ..runtime import Engine
        from .batching import Batcher, PixelBudget, run_pairs
        from .metrics import Metrics

        threads = None
        if config.replicas > 1:  # replicas of one node share its cores
            threads = max(1, (os.cpu_count() or 1) // config.replicas)
        self.config = config
        self.engine = Engine(config.model, device=config.device, precision=config.precision,
                             memory_budget=config.memory_budget, threads=threads,
                             spin=False)  # idle workers sleep: the proxy shares these cores
        self.terms = row_terms(self.engine.output_names)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = Metrics(self.replica)
        _state().update(token=config.token, metrics=self.metrics)
        info = self.engine.info
        self.identity = {"kind": info.graph, "sha256": sha256_file(config.model)}
        self.batcher = Batcher(
            lambda pairs: run_pairs(self.engine, pairs, self.terms, config.max_batch,
                                    on_call=self.metrics.batch.observe),
            config.max_batch, config.batch_wait_ms / 1000)
        self.held = PixelBudget(config.limits.max_held_pixels)

    def check_health(self) -> None:  # Ray Serve's health check: the replica answers
        return None

    # -- routes ------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> Response:
        return json_response({"status": "ready", "replica": self.replica, "pid": os.getpid()})

    @api.get("/v1/model")
    async def model(self) -> Response:
        info, c = self.engine.info, self.config
        return json_response({
            **self.identity, "terms": self.terms, "input_range": info.spec.input_range,
            "spec": info.spec.to_dict(), "loss": info.loss.to_dict() if info.loss is not None else None,
            "dtype": info.dtype, "providers": self.engine.providers, "min_size": info.spec.min_size,
            "max_batch": c.max_batch, "batch_wait_ms": c.batch_wait_ms, "replicas": c.replicas,
            "limits": {"max_body_bytes": c.limits.max_body_bytes, "max_pixels": c.limits.max_pixels,
                       "max_pairs": c.limits.max_pairs, "formats": list(c.limits.formats)},
        })

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")

    @api.post("/v1/distance")
    async def distance(self, request: Request) -> Response:
        start = time.perf_counter()
        form = await read_form(request, self.config.limits.max_body_bytes, 2)
        files = {}
        for field in ("a", "b"):
            got = await _files(form, field)
            if len(got) != 1:
                raise RequestError(f"{'missing' if not got else 'more than one'} file field {field!r}; "
                                   "accepted: one image file a and one b (curl -F a=@x.png -F b=@y.png).")
            files[field] = got[0]
        res = await self._pair(files["a"], files["b"])
        if isinstance(res, Exception):
            raise res
        return json_response(self._body(res, start))

    @api.post("/v1/distance/batch")
    async def distance_batch(self, request: Request) -> Response:
        start = time.perf_counter()
        most = self.config.limits.max_pairs
        form = await read_form(request, self.config.limits.max_body_bytes, 2 * most)
        a, b = await _files(form, "a"), await _files(form, "b")
        if not a or len(a) != len(b) or len(a) > most:
            raise RequestError(f"got {len(a)} file(s) a and {len(b)} b; accepted: 1 to {most} pairs, "
                               "fields a and b repeated in order (pair i is the i-th a and the i-th b).")
        results = await asyncio.gather(*(self._pair(x, y) for x, y in zip(a, b)))
        pairs = [self._pair_body(r) for r in results]
        return json_response({"pairs": pairs, "model": self.identity,
                              "ms": round(1000 * (time.perf_counter() - start), 3)})

    # -- helpers -----------------------------------------------------------------
    async def _pair(self, a: tuple[bytes, str], b: tuple[bytes, str]) -> Any:
        """The pair's {term: value}, or the exception that refused it."""
        spec, limits = self.engine.spec, self.config.limits
        # Decoded images held at once stay bounded. An image over max_pixels, or one Pillow
        # cannot read, is refused by decoding at its header (and max_held_pixels >= 2 x
        # max_pixels: a pair within the limits always fits).
        pixels = min(header_pixels(a[0]) + header_pixels(b[0]), limits.max_held_pixels)
        async with self.held.hold(pixels):
            try:
                pair = await asyncio.to_thread(decode_pair, a, b, limits, spec.input_range, spec.min_size)
            except RequestError as exc:
                return exc
            return await self.batcher.submit(pair)

    def _pair_body(self, res: Any) -> dict:
        if isinstance(res, Exception):
            return {"error": str(res).strip().splitlines()[0], "status": _status_of(res)}
        terms = {k: v for k, v in res.items() if k != "total"}
        return {"total": res["total"], "terms": terms}

    def _body(self, res: dict, start: float) -> dict:
        return {**self._pair_body(res), "model": self.identity,
                "ms": round(1000 * (time.perf_counter() - start), 3)}


def build(config: ServeConfig):
    """The bound application for ``serve.run``: replicas, queue limits, Retry-After."""
    from ray.serve.config import BackpressureConfig

    return DistanceServer.options(
        num_replicas=config.replicas,
        # A replica holds as many requests as two full batches, and at least 32 (waiting on
        # a future costs it nothing); the rest wait at the proxy, at most max_queued of
        # them, then 503 with Retry-After.
        max_ongoing_requests=max(32, 2 * config.max_batch),
        max_queued_requests=config.max_queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        logging_config=LOGGING,
        ray_actor_options={"num_cpus": 0},
    ).bind(config)
