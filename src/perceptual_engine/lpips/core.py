"""The LPIPS head (Zhang et al. 2018, the ``lpips`` package v0.1): formulas, weights.

Three trunks, as the lpips package's ``net``: "vgg" (VGG16, the default here), "alex"
(AlexNet) and "squeeze" (SqueezeNet 1.1), each at the package's taps (nets.py).

Per tap l with features f (N, C, h, w) of x and y::

    n(f)   = f / (sqrt(Σ_c f²) + 1e-10)              channel unit-normalization, per pixel
    d_l    = Σ_c w_l,c · (n(f_x) − n(f_y))²_c        a 1x1 conv, non-negative weights, no bias
    lpips_l = mean over h, w of d_l                   (N,)
    total   = Σ_l lpips_l
    spatial = Σ_l bilinear_upsample(d_l, (H, W))       (N, 1, H, W), align_corners=False

The head is computed in float32 whatever the network's precision: Σ_c f² of VGG
activations in the hundreds overflows float16 (max 65504).

The linear weights ``w_l`` come from the lpips package's ``weights/v0.1/<net>.pth`` (found
without importing lpips, which imports torchvision models and more) or from a file the
caller names. This module imports neither lpips nor anything optional.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from .. import losses as _losses, trunks as _trunks
from . import nets as _nets
from ..errors import ConfigError, LinearWeightsError, WrongNetError
from .nets import NETS, LpipsNet
from ..outputs import lpips_output_names
from ..spec import FeatureSpec

LAYERS: tuple[str, ...] = _nets.NETS["vgg"].layers  # the default net's taps (VGG16)
ARCH = _nets.NETS["vgg"].arch
EPS = 1e-10  # lpips.normalize_tensor's eps, added to the norm (not under the square root)
INSTALL_HINT = ("pip install perceptual-engine[lpips] (the package ships the weights), or give "
                "a file with lpips_weights=PATH / --lpips-weights PATH")


def output_names(layers: tuple[str, ...] = LAYERS, spatial: bool = False) -> tuple[str, ...]:
    """Outputs of an LPIPS graph, in order: ``lpips.<l>`` per tap, ``total``, [``spatial``]."""
    return lpips_output_names(layers, spatial)


def net_of(spec: FeatureSpec) -> LpipsNet:
    """The LPIPS net a spec runs (by its arch); ConfigError if its arch is none of them."""
    net = _nets.for_arch(spec.arch)
    if net is None:
        nets = sorted(NETS.values(), key=lambda n: n.name != _nets.DEFAULT)  # the default first
        accepted = [f"{n.arch!r} with layers {','.join(n.layers)} (net {n.name!r})" for n in nets]
        raise ConfigError(f"LPIPS needs arch {', '.join(accepted[:-1])} or {accepted[-1]}; got arch "
                          f"{spec.arch!r}. Use lpips.default_spec(weights, net=...) (on the command line: "
                          "--lpips-net NET and no --arch).")
    return net


def check_spec(spec: FeatureSpec) -> None:
    """LPIPS is defined on its nets' trunks at their taps, in order, with max pooling;
    anything else is refused."""
    net = net_of(spec)
    if spec.pooling != "max":
        raise ConfigError(f"LPIPS runs {spec.arch} with max pooling, as trained; got pooling {spec.pooling!r}. "
                          f"Drop pooling={spec.pooling!r} (--pooling {spec.pooling}).")
    if tuple(spec.layers) != net.layers:
        raise ConfigError(
            f"LPIPS needs arch {net.arch!r} with layers {','.join(net.layers)}; got arch {spec.arch!r} with "
            f"layers {','.join(spec.layers)}. Use lpips.default_spec(weights, net={net.name!r}) (on the "
            f"command line: --lpips-net {net.name} and no --layers)."
        )


def default_spec(weights: str = "imagenet", *, net: str = _nets.DEFAULT, input_range: str = "0,1",
                 seed: int = 0) -> FeatureSpec:
    """The spec of LPIPS on ``net`` ("vgg": VGG16, "alex": AlexNet, "squeeze": SqueezeNet
    1.1) at its taps; ``weights`` are the trunk's ("imagenet", "random" or a file);
    ``input_range`` "-1,1" is lpips' default, "0,1" its ``normalize=True``."""
    n = _nets.get(net)
    return FeatureSpec(arch=n.arch, layers=n.layers, weights=weights, seed=seed, input_range=input_range)


def spec_from_flags(flags: object) -> FeatureSpec:
    """The spec of an LPIPS graph from the command line's spec flags (an object with
    ``arch``, ``layers``, ``weights``, ``seed``, ``input_range``, ``pooling``, ``content``,
    ``style``, ``gram``, ``lpips_net``; None where not given): the net's trunk (--lpips-net,
    default vgg: VGG16) at its taps unless --arch or --layers say otherwise (then a
    ConfigError says what to change)."""
    given = [f"--{n}" for n in ("content", "style", "gram") if getattr(flags, n, None) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} describe a content/style loss; LPIPS has its own "
                          "head (channel-normalized differences, learned weights). Drop them.")
    seed = getattr(flags, "seed", None)
    chosen = getattr(flags, "lpips_net", None)
    arch = getattr(flags, "arch", None)
    if chosen is not None:
        net = _nets.get(chosen)
    else:  # --arch alone picks its net (check_spec refuses an arch that has none)
        net = (_nets.for_arch(arch) if arch else None) or _nets.get(_nets.DEFAULT)
    if chosen is not None and arch is not None and arch != net.arch:
        raise ConfigError(f"--lpips-net {net.name} runs arch {net.arch}, not --arch {arch}; drop --arch "
                          f"(or pick the net of {arch}).")
    spec = FeatureSpec(arch=arch or net.arch, layers=getattr(flags, "layers", None) or net.layers,
                       weights=getattr(flags, "weights", None) or "imagenet", seed=0 if seed is None else seed,
                       input_range=getattr(flags, "input_range", None) or "0,1",
                       pooling=getattr(flags, "pooling", None) or "max")
    check_spec(spec)
    return spec


# -- linear weights ------------------------------------------------------------------

@dataclass(frozen=True)
class LinearWeights:
    """The taps' 1x1 weights, each (1, C, 1, 1) float32, non-negative, finite (five
    for vgg and alex, seven for squeeze)."""

    weights: tuple[torch.Tensor, ...]
    source: str  # the file read
    sha256: str  # of the tensors (keys and float32 bytes), not of the pickle
    net: str = _nets.DEFAULT  # lpips' net: "vgg", "alex" or "squeeze"

    @property
    def layers(self) -> tuple[str, ...]:
        """The taps the weights are for, in order."""
        return NETS[self.net].layers

    def metadata(self, spatial: bool = False) -> dict[str, object]:
        """The model metadata's ``lpips`` field."""
        return {"weights_source": self.source, "weights_sha256": self.sha256, "spatial": bool(spatial),
                "net": self.net}


def resolve_weights(value: "LinearWeights | str | os.PathLike | None", spec: FeatureSpec | None = None) -> LinearWeights:
    """LinearWeights as given, or read from a path (None: the lpips package's file), for
    the net of ``spec`` (None: vgg). LinearWeights of another net are refused."""
    net = net_of(spec).name if spec is not None else _nets.DEFAULT
    lin = value if isinstance(value, LinearWeights) else load_linear_weights(value, net=net)
    if lin.net != net:
        raise ConfigError(f"the LPIPS linear weights {lin.source!r} are for net {lin.net!r}, but the spec "
                          f"runs net {net!r} ({spec.arch if spec is not None else ARCH}); give the "
                          f"{net} weights (or lpips_weights=None for the lpips package's).")
    return lin


def _keys(net: str = _nets.DEFAULT) -> dict[str, tuple[int, ...]]:
    return {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(NETS[net].channels())}


def default_weights_path(net: str = _nets.DEFAULT) -> str:
    """``lpips/weights/v0.1/<net>.pth`` of the installed lpips package (not imported)."""
    try:
        found = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        found = None
    folders = list(found.submodule_search_locations or []) if found is not None else []
    rel = NETS[net].weights_file
    for folder in folders:
        path = os.path.join(folder, *rel.split("/"))
        if os.path.isfile(path):
            return path
    what = "is not installed" if not folders else f"has no {rel} in {folders}"
    raise LinearWeightsError(f"the LPIPS linear weights were not found: the lpips package {what}. "
                       f"Fix: {INSTALL_HINT}.")


def load_linear_weights(path: str | os.PathLike | None = None, *, net: str = _nets.DEFAULT) -> LinearWeights:
    """Read and check LPIPS linear weights of ``net``; ``path`` None means the lpips
    package's file for that net.

    The file is a torch pickle loaded with ``weights_only=True`` (no code runs) onto
    the CPU; keys ``lin0..lin<K-1>.model.1.weight`` with shapes (1, C, 1, 1) (the net's
    taps) are required, nothing else is accepted, and every value must be finite and >= 0.
    """
    from ..weights import read_torch_file

    path = default_weights_path(net) if path is None else os.fspath(path)
    raw = read_torch_file(path, "LPIPS weights file", LinearWeightsError, formats=".pth")
    return check_linear_weights(raw, path, net=net)


def _fitting_nets(raw: Mapping) -> list[str]:
    """The nets whose keys and shapes ``raw`` holds exactly."""
    def shape(v: object) -> tuple[int, ...] | None:
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    return [n for n in NETS if set(raw) == set(_keys(n)) and all(shape(raw[k]) == s for k, s in _keys(n).items())]


def check_linear_weights(raw: object, source: str, *, net: str = _nets.DEFAULT) -> LinearWeights:
    """The checks of ``load_linear_weights`` on an already loaded mapping."""
    want = _keys(net)
    n_taps, label = len(want), _trunks.get(NETS[net].arch).label
    if isinstance(raw, Mapping):
        other = [n for n in _fitting_nets(raw) if n != net]
        if other:
            raise WrongNetError(
                f"LPIPS weights {source!r} are for net {other[0]!r} ({_trunks.get(NETS[other[0]].arch).label}), "
                f"not net {net!r} ({label}); use net {other[0]!r} (--lpips-net {other[0]}), or the "
                f"lpips package's {NETS[net].weights_file}.")
    if not isinstance(raw, Mapping):
        raise LinearWeightsError(f"LPIPS weights {source!r} hold a {type(raw).__name__}, not a state dict; "
                           f"accepted: a dict with keys {', '.join(want)}.")
    missing = [k for k in want if k not in raw]
    extra = [str(k) for k in raw if k not in want]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}"] if extra else [])
        raise LinearWeightsError(f"LPIPS weights {source!r} do not have the keys of lpips v0.1 {label} ({'; '.join(parts)}); "
                           f"accepted: exactly lin0..lin{n_taps - 1}.model.1.weight. Use the lpips package's "
                           f"{NETS[net].weights_file} or a file saved the same way.")
    from ..weights import checked_head_tensor

    out, h = [], hashlib.sha256()
    for key, shape in want.items():
        t = checked_head_tensor(
            raw[key], what="LPIPS", key=key, source=source, shape=shape, error=LinearWeightsError,
            shape_hint=f"({label}). Check the file is the {net} version.",
            file_fix="use the lpips package's file.",
            negative_fix="lpips clamps them in training: clamp them (w.clamp_(min=0)) or use "
                         "the package's file.", digest=h)
        out.append(t)
    # What the head derives from them: per tap Σ_c w_c·d_c with d_c = (n_x − n_y)² summing to
    # at most 4 over c (unit vectors), then the taps' sum, all in float32. Each weight finite
    # can still overflow that bound (weights near 3.4e38), which would make totals Inf.
    bound = 4 * sum(t.max() for t in out)
    if not torch.isfinite(bound):
        big = max(float(t.double().max()) for t in out)
        raise LinearWeightsError(
            f"LPIPS weights {source!r} reach {big:.3g}: the head's sum over channels and taps (up to 4 "
            "times the sum of each tap's largest weight) overflows float32; accepted: weights whose "
            f"bound is finite (as trained they are below 1). Use the lpips package's {NETS[net].weights_file}.")
    return LinearWeights(tuple(out), os.path.abspath(source) if os.path.exists(source) else source,
                         h.hexdigest(), net)


# -- the head ------------------------------------------------------------------------

def normalize_channels(f: torch.Tensor) -> torch.Tensor:
    """f / (‖f‖₂ over channels + 1e-10), in float32: (N, C, h, w) -> (N, C, h, w)."""
    return _normalized(f.float())


def tap_map(fx: torch.Tensor, fy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_c w_c (n(fx) − n(fy))²_c per pixel: (N, C, h, w) x2, w (1, C, 1, 1) -> (N, 1, h, w)."""
    d = normalize_channels(fx) - normalize_channels(fy)
    return (d * d * w).sum(dim=1, keepdim=True)


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=False, as lpips' spatial=True: (N, 1, h, w) -> (N, 1, H, W)."""
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def head(fx: Mapping[str, torch.Tensor], fy: Mapping[str, torch.Tensor], lin: LinearWeights,
         *, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``lpips.<l>`` (N,) per tap and ``total`` (N,); with ``size`` = (H, W) also
    ``spatial`` (N, 1, H, W). All float32."""
    return _outputs({name: tap_map(fx[name], fy[name], w) for name, w in zip(lin.layers, lin.weights)}, size)


def _outputs(maps: Mapping[str, torch.Tensor], size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """The head's outputs from each tap's per-pixel map (N, 1, h, w) float32: the maps'
    means, their sum ``total`` and, with ``size``, the upsampled maps' sum ``spatial``."""
    layers = tuple(maps)
    out = {f"lpips.{name}": maps[name].mean(dim=(1, 2, 3)) for name in layers}
    total = out[f"lpips.{layers[0]}"]
    for name in layers[1:]:
        total = total + out[f"lpips.{name}"]
    out["total"] = total
    if size is not None:
        spatial = upsample(maps[layers[0]], size)
        for name in layers[1:]:
            spatial = spatial + upsample(maps[name], size)
        out["spatial"] = spatial
    return out


# float16 features: the channel norms are summed in float32 (as torch sums a half tensor),
# the reciprocal capped at 2^14 so that it fits a float16 (only vectors with ‖f‖ < 6e-5, far
# below float16's resolution of the network's activations, are shortened by the cap), and
# the normalized features stay float16: no float32 copy of them is kept.
HALF_INV_NORM_CAP = 2.0 ** 14


def _normalized(f: torch.Tensor) -> torch.Tensor:
    """n(f) of ``normalize_channels`` in f's dtype (float32 as lpips)."""
    f32 = f.float()
    inv = 1.0 / (torch.sqrt((f32 * f32).sum(dim=1, keepdim=True)) + EPS)
    if f.dtype == torch.float16:
        inv = inv.clamp(max=HALF_INV_NORM_CAP).to(f.dtype)
    return f * inv


def head_pair(f: Mapping[str, torch.Tensor], n, lin: LinearWeights,
              *, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``head`` from the features of a joined batch (x's n images, then y's), as the
    exported graph computes it: each tap normalized once for both halves, the halves'
    difference without copying them out (``losses.half_difference``), Σ_c w_c d_c² as
    a 1×1 convolution. In the network's dtype up to the per-tap means (float32 out)."""
    maps = {}
    for name, w in zip(lin.layers, lin.weights):
        t = f[name]
        d = _losses.half_difference(_normalized(t), n).reshape(n, t.shape[1], t.shape[2], t.shape[3])
        # The one-channel map is cast before its mean: a float16 mean may hold the sum
        # over h·w in float16 before dividing.
        maps[name] = F.conv2d(torch.square(d), w.to(t.dtype)).float()
    return _outputs(maps, size)


# -- its vector-Jacobian product -------------------------------------------------------

def normalize_vjp(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """∂/∂f of <g, n(f)>, n(f) = f / (r + eps), r = ‖f‖ over channels.

    J = I/(r+eps) − f fᵀ / ((r+eps)² r), so g·J = g/(r+eps) − f (f·g) / ((r+eps)² r).
    Where r = 0 the feature vector f is 0, the second term is 0 and the result is
    g/eps: finite (autograd of sqrt at 0 gives 0·inf = NaN instead).
    """
    f, g = f.float(), g.float()
    r = torch.sqrt((f * f).sum(dim=1, keepdim=True))
    s = r + EPS
    r_safe = torch.where(r > 0, r, torch.ones_like(r))
    fg = (f * g).sum(dim=1, keepdim=True)
    return g / s - f * (fg / (s * s * r_safe))


def head_vjp(fx: Mapping[str, torch.Tensor], fy: Mapping[str, torch.Tensor], lin: LinearWeights,
             g_total: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂(Σ_n g_total[n] · total[n]) / ∂fx per tap: {layer: (N, C, h, w) float32}.

    Only x's features are differentiated; y is a constant.
    """
    out = {}
    for name, w in zip(lin.layers, lin.weights):
        a, b = fx[name], fy[name]
        hw = _losses.axis_size(a, 2) * _losses.axis_size(a, 3)  # float32: no int64 product (export/shapes.py)
        d = normalize_channels(a) - normalize_channels(b)
        # ∂ mean_hw Σ_c w_c d_c² / ∂n(fx) = 2 w d / (h·w), scaled by the sample's seed.
        gn = d * w * (2.0 * g_total.float().view(-1, 1, 1, 1) / hw)
        out[name] = normalize_vjp(a, gn)
    return out
