"""The lpips workload's PyTorch baseline: the lpips package's own module, as its users run it."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import WeightsError
from ..lpips.nets import NETS


class LpipsPackage(torch.nn.Module):
    """``lpips.LPIPS(net=net, pretrained=True, pnet_rand=True)``: the package's shipped
    linear weights, its trunk built without a download and then given the run's trunk
    weights (``Weights`` of the net's trunk: VGG16, AlexNet or SqueezeNet 1.1), so it
    computes what the engine's model computes.

    ``forward(x, y)`` with images in [-1, 1] -> {"lpips.<l>", "total"} (N,), from
    ``model(x, y, retPerLayer=True)``. Inputs are cast to the trunk's dtype, so the
    module moved to float16 takes the float32 images as a float16 user would.
    """

    def __init__(self, weights: Any, net: str = "vgg") -> None:
        super().__init__()
        try:
            import lpips
        except ImportError as exc:
            raise WeightsError("the lpips workload's baseline is the lpips package, which is not "
                               "installed: pip install perceptual-engine[lpips].") from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
        self.layers = NETS[net].layers
        with torch.no_grad():
            for name, p in self.model.net.named_parameters():
                # "slice2.5.weight" is features.5.weight, "slice2.3.squeeze.weight" features.3.squeeze.weight
                _, index, kind = name.split(".", 2)
                p.copy_(weights.state[f"features.{index}.{kind}"])
        for p in self.model.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = self.model.lin0.model[1].weight.dtype
        total, per = self.model(x.to(dtype), y.to(dtype), retPerLayer=True)
        out = {f"lpips.{n}": p.flatten() for n, p in zip(self.layers, per)}
        out["total"] = total.flatten()
        return out
