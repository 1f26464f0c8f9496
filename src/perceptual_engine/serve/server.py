"""Start, run and stop a server: Ray (local, or joined), Serve's proxy on host:port, the
application; and on the way out, the drain and every process that was started here."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from typing import Callable

from ..errors import ConfigError
from .config import ServeConfig, import_serve

APP = "perceptual-engine"
# Ray Serve's shorter request path (three of its "throughput-optimized" settings): the proxy
# reaches the replicas over gRPC, routes on its own event loop, and the replica runs the
# handlers on its main loop instead of handing each request to a second thread (ours hand
# their blocking work to threads anyway). On a 2-core machine they take the time between
# the proxy's receipt and the replica's answer from about 10 ms to about 5 ms per request
# (BENCHMARKS.md). Read by the processes of a local Ray when they start; a variable already
# set is kept. A joined cluster (--ray-address) keeps its own settings.
SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
             "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def run(config: ServeConfig, say: Callable[[str], None], *, on_ready: Callable[[str], None] = print) -> None:
    """Serve until KeyboardInterrupt (the command line's SIGINT/SIGTERM handlers raise it),
    then drain and stop. ``on_ready`` gets ``serving URL`` once /healthz answers 200."""
    import_serve()
    import ray
    from ray import serve

    from .app import LOGGING, build

    t0 = time.perf_counter()
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if config.ray_address:
        ray.init(address=config.ray_address, **quiet)
    else:  # always a new local Ray: never attach to another program's by accident
        for name, value in SERVE_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", include_dashboard=False, **quiet)
    # Ray's core worker installs a C-level SIGTERM handler that dumps a stack and ends the
    # process at once: put back the command line's, which drains first.
    for sig, handler in handlers.items():
        if callable(handler) or handler in (signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(sig, handler)
    had_serve = _serve_running(serve) if config.ray_address else False
    try:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(http_options={"host": config.host, "port": config.port,
                                  "request_timeout_s": config.request_timeout_s},
                    logging_config=LOGGING)
        serve.run(build(config), name=APP, route_prefix="/", blocking=False)
        wait_ready(config)
        where = f"Ray at {config.ray_address}" if config.ray_address else "a local Ray"
        say(f"{config.replicas} replica(s) of {config.model} on {where}, ready in "
            f"{time.perf_counter() - t0:.1f} s; max batch {config.max_batch}, batch wait "
            f"{config.batch_wait_ms:g} ms")
        on_ready(f"serving {config.url}")
        while True:
            time.sleep(3600)
    finally:
        _stop(serve, ray, had_serve, say)


def _serve_running(serve) -> bool:
    try:
        return bool(serve.status().proxies)
    except Exception:  # noqa: BLE001 - no Serve on the cluster yet
        return False


def _stop(serve, ray, had_serve: bool, say: Callable[[str], None]) -> None:
    """Drain: Serve stops sending new requests to the replicas, which finish what they
    hold (graceful_shutdown_timeout_s), then exit. On a joined cluster whose Serve was
    there before, only this application goes; Ray itself is left if it was joined."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        t0 = time.perf_counter()
        try:
            if had_serve:
                serve.delete(APP)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
        say(f"stopped in {time.perf_counter() - t0:.1f} s")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def wait_ready(config: ServeConfig, timeout_s: float = 120.0) -> None:
    """Until GET /healthz answers 200 (ConfigError after ``timeout_s``)."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else ("::1" if config.host == "::" else config.host)
    url = ServeConfig(model=config.model, host=host, port=config.port).url + "/healthz"
    headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
                if r.status == 200 and json.loads(r.read()).get("status") == "ready":
                    return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise ConfigError(f"the server did not answer {url} within {timeout_s:.0f} s ({last}); is port "
                      f"{config.port} taken by another program? Try --port.")
