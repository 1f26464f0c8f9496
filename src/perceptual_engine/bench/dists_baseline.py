"""PyTorch baselines of the dists and metrics workloads, as their users run them.

- ``DistsPackage``: the authors' ``DISTS_pytorch.DISTS`` module itself.
- ``TorchmetricsLpips``: torchmetrics' ``LearnedPerceptualImagePatchSimilarity(net_type="vgg")``,
  called as an evaluation loop does: ``update(x, y)`` per batch.

Both constructors would download torchvision's ImageNet VGG16; the download is patched out
for the construction and the run's trunk weights (``Weights``) copied in instead, so each
computes what the engine's model computes. Their head weights are the packages' own.
"""
from __future__ import annotations

import copy
import types
import warnings
from typing import Any

import torch

from ..errors import WeightsError


def _trunk(weights: Any) -> torch.nn.Sequential:
    import torchvision

    feats = torchvision.models.vgg16(weights=None).features.eval()
    feats.load_state_dict({k[len("features."):]: v for k, v in weights.state.items()
                           if k.startswith("features.") and int(k.split(".")[1]) < len(feats)})
    return feats


class DistsPackage(torch.nn.Module):
    """``DISTS_pytorch.DISTS()`` with the run's VGG16 trunk and the wheel's alpha/beta.

    ``forward(x, y)`` with images in [0, 1] -> {"total": (N,)}. Inputs are cast to the
    module's dtype, so the module moved to float16 takes float32 images as a user would.
    """

    def __init__(self, weights: Any) -> None:
        super().__init__()
        try:
            from DISTS_pytorch import DISTS_pt
        except ImportError as exc:
            raise WeightsError("the dists workload's baseline is DISTS_pytorch, which is not "
                               "installed: pip install perceptual-engine[dists].") from exc
        from ..dists import load_weights

        trunk = _trunk(weights)
        real = DISTS_pt.models
        DISTS_pt.models = types.SimpleNamespace(vgg16=lambda *a, **k: types.SimpleNamespace(features=trunk))
        try:
            self.model = DISTS_pt.DISTS(load_weights=False).eval()
        finally:
            DISTS_pt.models = real
        w = load_weights()  # the wheel's file (its own loader reads sys.prefix/weights.pt)
        with torch.no_grad():
            self.model.alpha.copy_(w.alpha)
            self.model.beta.copy_(w.beta)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = self.model.alpha.dtype
        return {"total": self.model(x.to(dtype), y.to(dtype)).reshape(-1)}


class TorchmetricsLpips(torch.nn.Module):
    """torchmetrics' LPIPS metric (VGG16, its bundled lpips v0.1 linear weights, images in
    [-1, 1]); ``forward(x, y)`` is one ``update(x, y)`` and returns that batch's scores as
    {"total": (N,)} (the list state is cleared every 64 calls, as ``reset()`` would)."""

    def __init__(self, weights: Any) -> None:
        super().__init__()
        try:
            from torchmetrics.functional.image import lpips as tml
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        except ImportError as exc:
            raise WeightsError("the metrics workload's baseline is torchmetrics, which is not "
                               "installed: pip install perceptual-engine[torchmetrics].") from exc
        trunk = _trunk(weights)
        real = tml._get_tv_model_features
        tml._get_tv_model_features = lambda net, pretrained=False: copy.deepcopy(trunk)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.metric = LearnedPerceptualImagePatchSimilarity(net_type="vgg")
        finally:
            tml._get_tv_model_features = real

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = next(self.metric.net.parameters()).dtype
        self.metric.update(x.to(dtype), y.to(dtype))
        scores = self.metric.all_scores
        last = scores[-1].reshape(-1)
        if len(scores) >= 64:
            self.metric.reset()
        return {"total": last}
