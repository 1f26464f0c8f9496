"""``perceptual-engine serve --model M.onnx``: perceptual distances over HTTP on Ray Serve
(docs/serve.md)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .common import INTERRUPTED, PROG, interrupt_status, interrupt_word
from .options import add_device_options, memory_budget, positive_int

DESCRIPTION = """\
Serve an exported distance, lpips or dists model over HTTP on Ray Serve: POST /v1/distance
(a multipart form with image files a and b), POST /v1/distance/batch, GET /v1/model,
GET /healthz, GET /metrics (Prometheus). Concurrent requests of one image size run as one
engine call (--max-batch); sizes are never changed. Prints `serving http://HOST:PORT`
when ready; Ctrl-C or SIGTERM drains the requests in flight and stops every process it
started (exit 130, or 143 after SIGTERM). Binding an address other than loopback needs
--token-file (or --insecure). Needs perceptual-engine[serve]."""


def register(sub, say: Callable[[str], None], fmt) -> None:
    from ..images import MAX_IMAGE_PIXELS
    from ..runtime import DEVICES
    from ..serve.config import Limits

    limits = Limits()
    p = sub.add_parser("serve", formatter_class=fmt, help="perceptual distances over HTTP (Ray Serve)",
                       description=DESCRIPTION,
                       epilog="exit status: 130 after Ctrl-C, 143 after SIGTERM (both drain first); "
                              "1 the server failed; 2 usage or configuration error")
    p.add_argument("--model", required=True, metavar="ONNX",
                   help="an exported model that compares two images (export --graph distance|lpips|dists)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1; another needs --token-file or --insecure)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    add_device_options(p, DEVICES)
    g = p.add_argument_group("batching and scale")
    g.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="pairs of one size per engine call at most; 1 turns batching off; batches are "
                        "also cut to the memory budget (default: 16)")
    g.add_argument("--batch-wait-ms", type=float, default=0.0, metavar="MS",
                   help="how long a free engine waits for a batch to fill; 0 runs at once, and "
                        "requests that arrive while it computes make the next batch (default: 0)")
    g.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                   help="replicas, each with its own Engine (default: 1)")
    g.add_argument("--max-queued", type=positive_int, default=64, metavar="N",
                   help="requests waiting beyond what the replicas hold; more are answered 503 with "
                        "Retry-After (default: 64)")
    g.add_argument("--memory-budget", type=memory_budget, metavar="SIZE",
                   help="the Engine's memory budget (4G, 50%%, 0 for none): batches are cut to fit, "
                        "a pair over it is refused with 413 (default: 80%% of the available memory)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="join this running Ray cluster (default: start a local Ray, stopped on exit)")
    g = p.add_argument_group("limits and security")
    g.add_argument("--token-file", metavar="FILE",
                   help="a file holding a token (16+ characters) every request must send as "
                        "'Authorization: Bearer TOKEN'")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token")
    g.add_argument("--max-body-mb", type=positive_int, default=limits.max_body_bytes >> 20, metavar="MB",
                   help=f"request body at most (default: {limits.max_body_bytes >> 20})")
    g.add_argument("--max-pixels", type=positive_int, default=limits.max_pixels, metavar="N",
                   help=f"pixels per image, checked before decoding (default: {limits.max_pixels}; "
                        f"at most {MAX_IMAGE_PIXELS})")
    g.add_argument("--max-pairs", type=positive_int, default=limits.max_pairs, metavar="N",
                   help=f"pairs per /v1/distance/batch request (default: {limits.max_pairs})")
    g.add_argument("--max-held-pixels", type=positive_int, default=None, metavar="N",
                   help="pixels of decoded images a replica holds at once; pairs wait for room "
                        f"(default: 2 pairs of --max-pixels, {limits.max_held_pixels} with its default)")
    p.set_defaults(func=lambda a: cmd_serve(a, say))


def config_from_args(args: argparse.Namespace):
    from ..errors import ConfigError
    from ..images import MAX_IMAGE_PIXELS
    from ..serve.config import Limits, ServeConfig, read_token

    if args.max_pixels > MAX_IMAGE_PIXELS:
        raise ConfigError(f"--max-pixels {args.max_pixels} is over the library's bound; accepted: at "
                          f"most {MAX_IMAGE_PIXELS}.")
    held = args.max_held_pixels if args.max_held_pixels is not None else 4 * args.max_pixels
    if held < 2 * args.max_pixels:
        raise ConfigError(f"--max-held-pixels {held} is below one pair of --max-pixels images "
                          f"({2 * args.max_pixels}); accepted: at least 2 x --max-pixels.")
    limits = Limits(max_body_bytes=args.max_body_mb << 20, max_pixels=args.max_pixels,
                    max_pairs=args.max_pairs, max_held_pixels=held)
    return ServeConfig(model=args.model, host=args.host, port=args.port, device=args.device,
                       precision=args.precision, max_batch=args.max_batch,
                       batch_wait_ms=args.batch_wait_ms, replicas=args.replicas,
                       ray_address=args.ray_address,
                       token=read_token(args.token_file) if args.token_file else None,
                       insecure=args.insecure, max_queued=args.max_queued,
                       memory_budget=args.memory_budget, limits=limits)


def cmd_serve(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from ..serve import config as C
    from ..serve.server import run

    config = config_from_args(args)
    C.check(config)  # the model's kind, the bind address, the numbers: before Ray starts
    C.import_serve()

    def tell(msg: str) -> None:  # also while draining, after the signal (say would raise it again)
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)

    try:
        run(config, tell, on_ready=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        INTERRUPTED[0] = False  # reported here, after the drain
        tell(f"{interrupt_word()}; requests in flight were drained, every process started here stopped")
        return interrupt_status()
    return 0
