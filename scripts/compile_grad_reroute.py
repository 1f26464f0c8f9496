"""Is the bench's torch-compile `train` error a reroute or a wrong gradient?

    python scripts/compile_grad_reroute.py [SIZE]     # default 224: the bench's train point

The bench's train case (VGG19 to relu4_4, random weights seed 0, batch 1, its seed-0
inputs): grad.x of eager float32 (the bench's snippet and the y-under-no_grad split) and of
torch.compile, each against a float64 reference (the same modules and losses.py formulas,
every float32 cast kept in float64). Prints per variant the forward terms' error, grad.x's
error with 0, 0.1% and 1% of the elements forgiven (export/verify.compare), and the share
of elements off by more than 1e-4 and 1e-3 of the reference's scale. A reroute is sparse
(a few elements far off, the rest at rounding); a wrong gradient is off everywhere.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from perceptual_engine.bench import training
from perceptual_engine.bench import workloads as W
from perceptual_engine.export.verify import compare
from perceptual_engine.spec import FeatureSpec
from perceptual_engine.weights import load_weights


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 224
    torch.set_num_threads(1)
    spec = FeatureSpec(arch="vgg19", layers=("relu1_2", "relu2_2", "relu3_4", "relu4_4"), weights="random", seed=0)
    case = W.make_case(W.get("train"), spec, size, 1, n_sets=3, seed=0)
    model = W.torch_model(case, load_weights(case.spec))
    feeds = {k: torch.from_numpy(v) for k, v in case.sets[0].items()}

    def run(terms):
        return {k: v.double().numpy() for k, v in training.value_and_grad(terms, feeds).items()}

    results = {"eager-snippet": run(training.terms_fn(case, model, snippet=True)),
               "eager-split": run(training.terms_fn(case, model, snippet=False))}
    t = time.time()
    results["compile"] = run(torch.compile(training.terms_fn(case, model, snippet=False), dynamic=False))
    compile_s = time.time() - t
    # float64 reference: the formulas call .float() on features; keep them in float64.
    orig = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self.to(torch.float64)  # type: ignore[method-assign]
    try:
        m64 = model.double()
        x = torch.from_numpy(case.sets[0]["x"]).double().requires_grad_(True)
        y = torch.from_numpy(case.sets[0]["y"]).double()
        out = training.terms_fn(case, m64, snippet=False)(x, y)
        out["total"].sum().backward()
    finally:
        torch.Tensor.float = orig  # type: ignore[method-assign]
    ref = {k: v.detach().numpy() for k, v in out.items()}
    ref["grad.x"] = x.grad.numpy()
    print(f"size {size}, compile {compile_s:.0f} s; each against float64:")
    for name, got in results.items():
        g, r = got["grad.x"], ref["grad.x"]
        err, scale = np.abs(g - r), np.abs(r).max()
        fwd = max(compare(got[k], ref[k]).max_rel for k in ref if k != "grad.x")
        print(f"{name:14s} terms {fwd:.2e}  grad.x {compare(g, r).max_rel:.2e}, 0.1% forgiven "
              f"{compare(g, r, 1e-3).max_rel:.2e}, 1% forgiven {compare(g, r, 1e-2).max_rel:.2e}; "
              f"share > 1e-4: {(err > 1e-4 * scale).mean():.2e}, > 1e-3: {(err > 1e-3 * scale).mean():.2e}")


if __name__ == "__main__":
    main()
