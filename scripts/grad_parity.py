"""Gradient parity figures: grad.x of exported models on ONNX Runtime CPU against an
independent float64 computation (torchvision's VGG run by hand, autograd).

    python scripts/grad_parity.py

Seeded random torchvision weights; three exports (float32 vgg19 target graph with max
pooling, float32 vgg16 distance graph with avg pooling and [-1, 1] input, float16 vgg19
target graph). Prints one JSON line per model: the export's own verification error and
the relative error max|a − b| / max|b| against float64, with the share of elements
beyond 1e-4 (float32) or 5e-2 (float16).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import gradref  # noqa: E402  (the tests' independent reference)


def main() -> int:
    import torchvision

    from perceptual_engine import Engine, FeatureSpec, LossConfig, export_onnx

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        feats = {}
        for arch in ("vgg19", "vgg16"):
            torch.manual_seed(1)
            f = getattr(torchvision.models, arch)(weights=None).features.eval()
            with torch.no_grad():
                for m in f:
                    if isinstance(m, torch.nn.Conv2d):
                        m.bias.copy_(torch.randn(m.out_channels) * 0.05)
            torch.save({f"features.{k}": v for k, v in f.state_dict().items()}, os.path.join(tmp, f"{arch}.pth"))
            feats[arch] = f
        target_loss = LossConfig(content={"conv1_1": 0.5, "relu2_1": 1.0}, style={"relu1_2": 1.0, "pool1": 2.0})
        cases = [
            ("vgg19 target max [0,1] chw", FeatureSpec(layers=("conv1_1", "relu1_2", "pool1", "relu2_1"),
             weights=os.path.join(tmp, "vgg19.pth")), "target", target_loss, "float32", 1e-4),
            ("vgg16 distance avg [-1,1] hw", FeatureSpec(arch="vgg16", layers=("relu1_2", "relu2_1"),
             weights=os.path.join(tmp, "vgg16.pth"), input_range="-1,1", pooling="avg"), "distance",
             LossConfig(content={"relu2_1": 1.0}, style={"relu1_2": 1.0}, gram="hw"), "float32", 1e-4),
            ("vgg19 target max [0,1] chw float16", FeatureSpec(layers=("relu1_2", "relu2_1"),
             weights=os.path.join(tmp, "vgg19.pth")), "target",
             LossConfig(content={"relu2_1": 1.0}, style={"relu1_2": 1.0}), "float16", 5e-2),
        ]
        for name, spec, graph, loss, dtype, tol in cases:
            path = os.path.join(tmp, "m.onnx")
            r = export_onnx(spec, path, graph=graph, loss=loss, dtype=dtype, grad=True)
            engine = Engine(path, device="cpu")
            lo = -1.0 if spec.input_range == "-1,1" else 0.0
            x = rng.uniform(lo, 1.0, (3, 3, 61, 47)).astype(np.float32)
            other = rng.uniform(lo, 1.0, (3 if graph == "distance" else 1, 3, 61, 47)).astype(np.float32)
            if graph == "distance":
                out = engine.distance(x, other)
                _, ref = gradref.grad_x(feats[spec.arch], spec, loss, x, y=other)
            else:
                engine.set_target(content=other, style=other)
                out = engine.distance(x)
                _, ref = gradref.grad_x(feats[spec.arch], spec, loss, x, content_image=other, style_image=other)
            err = np.abs(out["grad.x"].astype(np.float64) - ref) / np.abs(ref).max()
            print(json.dumps({
                "model": name, "dtype": dtype, "x": list(x.shape),
                "export_check_grad_x_rel": float(f"{r.errors['grad.x'].max_rel:.3g}"),
                "vs_float64_max_rel": float(f"{err.max():.3g}"),
                "vs_float64_p99.9_rel": float(f"{np.quantile(err, 0.999):.3g}"),
                f"share_beyond_{tol:g}": float(f"{(err > tol).mean():.3g}"),
            }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
