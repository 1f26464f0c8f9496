"""Measure the peak host memory of one Engine call and compare it with the estimate.

    python scripts/memory_probe.py [--sizes 512,1024,2048] [--json out.json]
                                   [--models DIR] [--arena on|off] [--threads N]

Exports (once, into --models) random-weight VGG19 models to relu4_4 (a distance
graph with the CLI's default loss, one with content relu2_2 and style on the four
layers, and a features graph) and shallow ones (to relu2_2: a distance graph, and a
target graph with style and a gradient), then runs every configuration in its own subprocess, so one call's
peak is not hidden by another's. In the child: open the Engine, make the inputs'
room (nothing else), read VmRSS, reset the high-water mark (``/proc/self/clear_refs``),
make the inputs, make one call, read VmHWM. The figure is VmHWM minus the RSS after
loading: what the call (inputs included) adds to a process that holds the model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = (
    # (label, model key, pair?)
    ("vgg19 relu4_4 distance (pair)", "distance", True),
    ("vgg19 relu4_4 features (single)", "features", False),
    ("vgg19 relu2_2 distance (pair)", "shallow", True),
    # content relu2_2 plus style on the four layers: the model README and docs/cli.md use
    ("vgg19 relu4_4 distance+style (pair)", "styled", True),
    ("vgg19 relu2_2 target+style, grad", "target_grad", False),
)


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str, pair: bool, n: int, side: int, arena: str | None, threads: int | None) -> dict:
    """One call in this process; returns the measured bytes (run with --child)."""
    import numpy as np

    from perceptual_engine import Engine

    engine = Engine(path, device="cpu", threads=threads, max_pixels=None,
                    cpu_arena=None if arena is None else arena == "on")
    rng = np.random.default_rng(0)
    if engine.info.graph == "target":  # the cached targets belong to the engine, not the call
        t = rng.random((1, 3, side, side), dtype=np.float32)
        engine.set_target(content=t, style=t)
        del t
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    x = rng.random((n, 3, side, side), dtype=np.float32)
    if pair:
        y = rng.random((n, 3, side, side), dtype=np.float32)
        engine.distance(x, y)
    elif engine.info.graph == "target":
        engine.distance(x)
    else:
        engine.features(x)
    peak = _status("VmHWM")
    return {"baseline_rss": base, "peak_rss": peak, "call_bytes": peak - base}


def export_models(folder: str) -> dict[str, str]:
    from perceptual_engine import FeatureSpec, LossConfig, export_onnx

    os.makedirs(folder, exist_ok=True)
    deep = FeatureSpec(arch="vgg19", weights="random")  # relu1_2, relu2_2, relu3_4, relu4_4
    shallow = FeatureSpec(arch="vgg19", layers=("relu1_2", "relu2_2"), weights="random")
    styled = LossConfig(content={"relu2_2": 1.0}, style={n: 1.0 for n in deep.layers})
    shallow_styled = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0, "relu2_2": 1.0})
    jobs = {"distance": (deep, "distance", LossConfig.default_for(deep), False),
            "features": (deep, "features", None, False),
            "shallow": (shallow, "distance", LossConfig.default_for(shallow), False),
            "styled": (deep, "distance", styled, False),
            "target_grad": (shallow, "target", shallow_styled, True)}
    out = {}
    for key, (spec, graph, loss, grad) in jobs.items():
        path = os.path.join(folder, f"{key}.onnx")
        if not os.path.exists(path):
            print(f"exporting {path}", file=sys.stderr, flush=True)
            export_onnx(spec, path, graph=graph, loss=loss, grad=grad)
        out[key] = path
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024,2048")
    ap.add_argument("--batch", type=int, default=1, help="N (a pair runs 2N images)")
    ap.add_argument("--models", default="/tmp/perceptual-engine-memprobe")
    ap.add_argument("--arena", choices=("on", "off"), default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated model keys to run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=3, metavar=("PATH", "PAIR", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        path, pair, side = args.child
        print(json.dumps(child(path, pair == "1", args.batch, int(side), args.arena, args.threads)))
        return 0

    from perceptual_engine.memory import estimate
    from perceptual_engine.runtime.engine import read_info

    models = export_models(args.models)
    rows = []
    for label, key, pair in CONFIGS:
        if args.only and key not in args.only.split(","):
            continue
        info = read_info(models[key])
        for side in (int(s) for s in args.sizes.split(",")):
            cmd = [sys.executable, __file__, "--batch", str(args.batch), "--child", models[key],
                   "1" if pair else "0", str(side)]
            if args.arena:
                cmd += ["--arena", args.arena]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                row = {"config": label, "side": side, "error": proc.stderr.strip().splitlines()[-1:]}
            else:
                row = {"config": label, "side": side, **json.loads(proc.stdout.strip().splitlines()[-1])}
            taps = None if info.loss is None else tuple(dict.fromkeys((*info.loss.content,
                                                                       *info.loss.style)))
            est = estimate(info.spec, info.graph, args.batch, side, side, dtype=info.dtype,
                           taps=taps, arena=args.arena == "on", grad=bool(info.grad),
                           grams=tuple(info.loss.style) if info.loss is not None else ())
            row["estimate_bytes"] = est.total
            if "call_bytes" in row:
                row["ratio"] = est.total / row["call_bytes"]
            rows.append(row)
            meas = f"{row['call_bytes'] / 2**20:9.0f} MiB" if "call_bytes" in row else "   failed"
            print(f"{label:34s} {side:5d}²  measured {meas}  estimate {est.total / 2**20:9.0f} MiB"
                  + (f"  ratio {row['ratio']:.2f}" if "ratio" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
