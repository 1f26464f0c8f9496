"""Cost of the load-time integrity check on VGG19 to relu4_4, next to session creation.

    python scripts/integrity_cost.py [MODEL.onnx] [--repeat 7]

Exports VGG19 to relu4_4 with seeded random weights (float32, 42 MB) to MODEL.onnx if
it does not exist, then prints the median wall (time.perf_counter) and CPU
(time.process_time) milliseconds of each step of ``integrity.read_model`` and of an
ONNX Runtime CPU session on the same file.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="vgg19_relu4_4.onnx")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort

    from perceptual_engine import FeatureSpec, export_onnx
    from perceptual_engine.export import integrity

    path = args.model
    if not os.path.exists(path):
        export_onnx(FeatureSpec(arch="vgg19", layers=("relu4_4",), weights="random"), path, verify=False)
    with open(path, "rb") as fh:
        data = fh.read()
    model = onnx.load_model_from_string(data)
    props = {p.key: p.value for p in model.metadata_props}

    def timed(label: str, fn) -> None:
        wall, cpu = [], []
        for _ in range(args.repeat):
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        print(f"{label:<48} wall {statistics.median(wall) * 1e3:8.1f} ms   "
              f"cpu {statistics.median(cpu) * 1e3:8.1f} ms")

    def first_load() -> None:
        integrity._VERIFIED.clear()  # forget the file: hash it again
        integrity.read_model(path)

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB, load average {os.getloadavg()[0]:.1f}")
    timed("graph_digest", lambda: integrity.graph_digest(model))
    timed("metadata_digest", lambda: integrity.metadata_digest(props))
    timed("parse (onnx.load_model_from_string)", lambda: onnx.load_model_from_string(data))
    timed("read_model, first load of the file", first_load)
    timed("read_model, same file again (digest cached)", lambda: integrity.read_model(path))
    timed("onnxruntime.InferenceSession (CPU)",
          lambda: ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))


if __name__ == "__main__":
    main()
