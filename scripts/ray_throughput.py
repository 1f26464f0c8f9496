"""Pairs/s of `distance` on one folder: the single-process command, then --ray with 1 and 2
actors, one after the other in one run; and where Ray's time goes.

    PYTHONPATH=src python scripts/ray_throughput.py [--pairs 120] [--size 96] [--out DIR]

Each mode runs as its own `perceptual-engine distance` process on the same folder and
model (VGG19 to relu2_2, seeded random weights, exported once before timing), writing
JSON lines. Printed per mode: the process's wall time, the command's own summary line
(pairs/s over the run), and for Ray the start of Ray and the time to the first row.
Then, in this process: the cost of a fresh worker's imports and of opening the Engine,
which every Ray worker pays once.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time


def make_folder(root: str, pairs: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for side in ("a", "b"):
        os.makedirs(os.path.join(root, side), exist_ok=True)
    for i in range(pairs):
        for side in ("a", "b"):
            arr = (rng.random((size, size + 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(root, side, f"img{i:04d}.png"))


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=120)
    ap.add_argument("--size", type=int, default=96, help="image height; width is +8")
    ap.add_argument("--out", default="ray-throughput")
    args = ap.parse_args()

    from perceptual_engine import FeatureSpec, LossConfig, export_onnx

    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "pairs")
    if not os.path.isdir(data):
        make_folder(data, args.pairs, args.size)
    model = os.path.join(args.out, "vgg19-relu2_2.onnx")
    if not os.path.isfile(model):
        spec = FeatureSpec(arch="vgg19", layers=("relu1_2", "relu2_2"), weights="random")
        export_onnx(spec, model, graph="distance",
                    loss=LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0, "relu2_2": 1.0}))

    base = [sys.executable, "-m", "perceptual_engine.cli", "distance", os.path.join(data, "a"),
            os.path.join(data, "b"), "--model", model, "--format", "csv", "--batch-size", "8"]
    modes = {"single process": [], "ray, 1 actor": ["--ray", "--ray-actors", "1"],
             "ray, 2 actors": ["--ray", "--ray-actors", "2"]}
    print(f"{args.pairs} pairs of {args.size}x{args.size + 8} PNGs, VGG19 to relu2_2, CPU, "
          f"{os.cpu_count()} cores")
    for label, extra in modes.items():
        out = os.path.join(args.out, f"{label.replace(' ', '_').replace(',', '')}.jsonl")
        wall, err = run(base + extra + ["--output", out])
        summary = [line for line in err.splitlines() if "pair(s):" in line][-1]
        rate = float(re.search(r"([0-9.]+) pairs/s", summary).group(1))
        started = re.search(r"Ray started in ([0-9.]+) s", err)
        print(f"\n{label}: {args.pairs / wall:.1f} pairs/s over the whole process ({wall:.1f} s), "
              f"{rate:.1f} pairs/s in the run")
        if started:
            print(f"  Ray start {started.group(1)} s")
        print("  " + summary.replace("perceptual-engine: ", ""))

    # What a fresh Ray worker pays once: imports of the decode and actor code, the Engine.
    code = ("import time; t=time.perf_counter(); import perceptual_engine.distributed.stages; "
            "t1=time.perf_counter(); from perceptual_engine.runtime import Engine; "
            f"e=Engine({model!r}, 'cpu'); t2=time.perf_counter(); "
            "print(f'{t1-t:.2f} {t2-t1:.2f}')")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imports, engine = proc.stdout.split()
    print(f"\nworker start-up, measured in a fresh process: {time.perf_counter() - start:.2f} s in "
          f"all; imports of the decode stage {imports} s, Engine import and session {engine} s")


if __name__ == "__main__":
    main()
