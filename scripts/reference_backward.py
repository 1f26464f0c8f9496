"""Time TorchPerceptualLoss forward + backward with respect to x, y not requiring grad:
x and y as one batch of 2N (the old path: autograd runs a 2N backward) against x and
y as two batches, y's under no_grad (the current path).

    python scripts/reference_backward.py [--batch 4] [--size 128] [--repeats 7]

Random VGG19 weights, the default layers (relu1_2 .. relu4_4), content terms of weight
1 on each. Prints one JSON line: median seconds per step of each path and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    from perceptual_engine import FeatureSpec, TorchPerceptualLoss

    loss = TorchPerceptualLoss(FeatureSpec(weights="random"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).requires_grad_()
    y = torch.rand(args.batch, 3, args.size, args.size, generator=g)

    def one_batch():  # the previous forward: x and y through the network together
        return loss.terms(*loss.features.extract_pair(x, y))

    def two_batches():
        return loss(x, y)

    times: dict[str, list[float]] = {"one_batch_2n": [], "two_batches": []}
    grads = {}
    for i in range(args.repeats + 1):  # the first round warms up
        for name, fn in (("one_batch_2n", one_batch), ("two_batches", two_batches)):
            x.grad = None
            start = time.perf_counter()
            fn()["total"].sum().backward()
            if i:
                times[name].append(time.perf_counter() - start)
            grads[name] = x.grad.clone()
    med = {k: statistics.median(v) for k, v in times.items()}
    err = float((grads["one_batch_2n"] - grads["two_batches"]).abs().max() / grads["one_batch_2n"].abs().max())
    print(json.dumps({
        "batch": args.batch, "size": args.size, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "speedup": round(med["one_batch_2n"] / med["two_batches"], 3),
        "grad_rel_diff": err,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
