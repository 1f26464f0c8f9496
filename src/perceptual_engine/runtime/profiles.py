"""TensorRT optimization profiles: which graph inputs have dynamic shapes, and the
(N, H, W) range the engine is built for (``trt_profile_{min,opt,max}_shapes``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

from .. import layers as _layers
from ..errors import ConfigError


@dataclass(frozen=True)
class ProfileInput:
    """A dynamic graph input TensorRT needs a profile for: ``batched`` image inputs
    are (N, channels, H, W); a target graph's cached content features are
    (1, channels, size(H), size(W)), following the image's size: ``size`` is the layer's
    exact side (LayerInfo.size: AlexNet's strided conv and 3x3 pools are not H // 8),
    H // downsample where it is not given."""

    name: str
    channels: int = 3
    downsample: int = 1
    batched: bool = True
    size: Callable[[int], int] | None = None

    def side(self, image_side: int) -> int:
        side = self.size(image_side) if self.size is not None else image_side // self.downsample
        return max(side, 1)


ProfileInputs = Sequence[Union[str, ProfileInput]]


def profile_inputs(arch: str, names: Sequence[str]) -> list[ProfileInput]:
    """The inputs of a graph with dynamic shapes, as the TensorRT profile needs them.

    ``x``/``y`` are images; ``target.content.<l>`` follow x's size at layer l;
    ``target.gram.<l>`` are (1, C, C), static, and need no profile. ONNX Runtime's
    TensorRT EP refuses a session whose explicit profile misses a dynamic input.
    """
    out = []
    for name in names:
        if name in ("x", "y"):
            out.append(ProfileInput(name))
        elif name.startswith("target.content."):
            info = _layers.resolve(arch, name[len("target.content."):])
            out.append(ProfileInput(name, info.channels, info.downsample, batched=False, size=info.size))
    return out


@dataclass(frozen=True)
class ShapeRange:
    """TensorRT optimization profile: (N, H, W) min/opt/max of every image input.

    TensorRT builds its engine for the whole range when the session starts and
    sizes its memory by ``max``; the default (up to 8 images of 512x512) builds in
    reasonable time and memory. Widen it for larger inputs, e.g.
    ``ProviderOptions(shapes=ShapeRange(max=(16, 1024, 1024)))`` (docs/gpu.md).
    """

    min: tuple[int, int, int] = (1, 32, 32)
    opt: tuple[int, int, int] = (1, 224, 224)
    max: tuple[int, int, int] = (8, 512, 512)

    def __post_init__(self) -> None:
        for a, b in ((self.min, self.opt), (self.opt, self.max)):
            if len(a) != 3 or len(b) != 3 or any(i > j for i, j in zip(a, b)):
                raise ConfigError(
                    f"shape range min {self.min} <= opt {self.opt} <= max {self.max} does not "
                    "hold; give (batch, height, width) triples ordered element-wise."
                )

    def profile(self, inputs: ProfileInputs) -> dict[str, str]:
        """trt_profile_{min,opt,max}_shapes for every input (a plain name is an image)."""
        specs = [ProfileInput(i) if isinstance(i, str) else i for i in inputs]
        if not specs:  # a static-shape model: TensorRT takes its shapes from the graph
            return {}

        def fmt(nhw: tuple[int, int, int]) -> str:
            n, h, w = nhw
            return ",".join(f"{i.name}:{n if i.batched else 1}x{i.channels}x{i.side(h)}x{i.side(w)}"
                            for i in specs)

        return {
            "trt_profile_min_shapes": fmt(self.min),
            "trt_profile_opt_shapes": fmt(self.opt),
            "trt_profile_max_shapes": fmt(self.max),
        }
