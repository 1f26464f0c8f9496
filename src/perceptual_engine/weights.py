"""Where the convolution weights come from: ImageNet download, a file, or a seed.

Every source ends as the same thing: ``{"features.N.weight": tensor, ...}`` for the
convolutions up to the deepest requested layer, float32, checked against the
architecture, plus the SHA-256 of exactly those tensors (so two sources with the
same numbers have the same hash).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from . import layers as _layers, trunks as _trunks
from .errors import WeightsError, WrongTrunkError, first_line
from .spec import FeatureSpec

# torchvision's published checkpoints (the IMAGENET1K_V1 weights), one per trunk.
IMAGENET_URLS = {t.name: t.url for t in _trunks.TRUNKS.values()}


@dataclass(frozen=True)
class Weights:
    state: Mapping[str, torch.Tensor]  # "features.N.weight"/"features.N.bias", float32
    source: str  # "imagenet", "random(seed=0)" or the file path
    sha256: str


def _conv_keys(spec: FeatureSpec) -> list[tuple[str, tuple[int, ...]]]:
    return _layout(spec.arch, _layers.resolve(spec.arch, spec.deepest).index)


def _layout(arch: str, last: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(torchvision state-dict key, shape) of the trunk's parameters up to index ``last``."""
    return [(f"features.{info.index}.{suffix}", shape) for info in _layers.table(arch)
            if last is None or info.index <= last for suffix, shape in info.params]


def fitting_trunks(raw: Mapping[str, object]) -> tuple[str, ...]:
    """The registered trunks whose whole ``features`` layout (keys and shapes) ``raw``
    holds: what a weights file fits, for messages about a file of another trunk."""
    def shape(key: str) -> tuple[int, ...] | None:
        t = raw.get(key, raw.get(key[len("features."):]))
        return tuple(t.shape) if isinstance(t, torch.Tensor) else None

    return tuple(name for name in _trunks.TRUNKS
                 if all(shape(key) == want for key, want in _layout(name)))


def _digest(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _random_state(spec: FeatureSpec) -> dict[str, torch.Tensor]:
    # Kaiming-normal (fan_out, as torchvision initializes VGG) with small nonzero
    # biases, from a private generator: reproducible and no global RNG touched.
    g = torch.Generator().manual_seed(spec.seed)
    state = {}
    for key, shape in _conv_keys(spec):
        if key.endswith(".weight"):
            std = (2.0 / (shape[0] * shape[2] * shape[3])) ** 0.5
            state[key] = torch.randn(shape, generator=g) * std
        else:
            state[key] = torch.randn(shape, generator=g) * 0.01
    return state


def _download_imagenet(arch: str) -> Mapping[str, torch.Tensor]:
    url = IMAGENET_URLS[arch]
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as exc:  # network, hash or disk errors: all mean "no weights"
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsError(
            f"could not download the ImageNet {arch} weights from {url} ({type(exc).__name__}: "
            f"{exc}). Accepted: a reachable download, the file already in {hub}, or a local "
            f"file: pass weights='path/to/{arch}.pth' (or .safetensors), or weights='random' "
            "for seeded random weights (not a meaningful perceptual distance)."
        ) from exc


def read_torch_file(path: str, what: str, error: type[WeightsError] = WeightsError,
                    formats: str = ".pth/.safetensors") -> object:
    """``torch.load(path, weights_only=True)`` with every failure as one ``error`` line.

    what: how the message names the file ("weights file", "LPIPS weights file");
    formats: the files accepted, for the messages (".pth/.safetensors", ".pth").
    A file that is missing, a folder, empty, truncated, random bytes, a pickle of
    Python objects or unreadable (permissions) all end here, never as an exception
    of torch's or pickle's (whose messages may be empty or suggest weights_only=False).
    """
    if not os.path.isfile(path):
        kind = "a folder" if os.path.isdir(path) else "missing"
        raise error(f"{what} {path!r} is {kind}; give the path of a "
                    f"{' or '.join(formats.split('/'))} file.")
    try:
        if os.path.getsize(path) == 0:
            raise error(f"{what} {path!r} is empty (0 bytes): the download or copy did not "
                        "finish. Re-download or re-save it.")
        # weights_only=True: a pickle that would run code or build arbitrary objects is refused.
        with warnings.catch_warnings():
            # "Detected pickle protocol 4": torch's note on files saved by older
            # versions, which it loads fine; not the user's concern.
            warnings.filterwarnings("ignore", message=r".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except pickle.UnpicklingError as exc:
        # torch's own message suggests weights_only=False, exactly what must not be done.
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"GLOBAL ([\w.]+)", plain)
        if found:
            raise error(
                f"{what} {path!r} was refused: it holds Python objects beyond tensors "
                f"({found.group(1)}), which could execute code when loaded. Accepted: a plain "
                "state dict of tensors; re-save it with torch.save(model.state_dict(), path) or as "
                ".safetensors."
            ) from exc
        # No GLOBAL named: random bytes, a cut file or a pickle the safe loader cannot parse.
        raise error(f"{what} {path!r} was refused by torch's safe loader (weights_only=True): "
                    f"it is damaged, truncated or not a {formats} file, or holds Python objects "
                    "beyond tensors, which could execute code when loaded. Accepted: a plain "
                    "state dict of tensors saved with torch.save; re-download or re-save it.") from exc
    except Exception as exc:  # EOFError, RuntimeError, KeyError, OSError: all "unreadable"
        raise error(f"{what} {path!r} could not be read ({first_line(exc, 200)}); it may be "
                    f"truncated or not a {formats} file. Re-download or re-save it.") from exc


def _read_file(path: str) -> Mapping[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            kind = "a folder" if os.path.isdir(path) else "missing"
            raise WeightsError(f"weights file {path!r} is {kind}; give the path of a .pth or "
                               ".safetensors file.")
        try:
            from safetensors.torch import load_file

            obj: object = load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own types (and OSError)
            raise WeightsError(
                f"weights file {path!r} could not be read ({first_line(exc, 200)}); it may be "
                "truncated or not a .pth/.safetensors file. Re-download or re-save it."
            ) from exc
    else:
        obj = read_torch_file(path, "weights file")
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"weights file {path!r} holds a {type(obj).__name__}, not a state dict; save "
            "model.state_dict() of a torchvision model (VGG, AlexNet, SqueezeNet)."
        )
    return obj


def _check(spec: FeatureSpec, raw: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    missing, bad = [], []
    for key, shape in _conv_keys(spec):
        t = raw.get(key)
        if t is None:
            t = raw.get(key[len("features."):])  # a bare ``features`` module's state dict
        if t is None:
            missing.append(key)
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            bad.append(f"{key} has dtype {kind} (accepted: a floating-point tensor)")
            continue
        if tuple(t.shape) != shape:
            bad.append(f"{key} has shape {tuple(t.shape)}, {spec.arch} needs {shape}")
            continue
        state[key] = t.detach().to(torch.float32).contiguous()
    # A file that fits another registered trunk whole: the arch is what to change (exit 2).
    other = [t for t in fitting_trunks(raw) if t != spec.arch] if missing or bad else []
    error, fits = (WrongTrunkError, f" The file is a torchvision {' or '.join(other)} state dict: use arch "
                   f"{other[0]!r} with it, or a checkpoint of {spec.arch}.") if other else (WeightsError, "")
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise error(
            f"weights {source!r} lack {len(missing)} key(s) {spec.arch} needs up to "
            f"{spec.deepest}: {shown}. Accepted: a torchvision {spec.arch} state dict "
            f"(keys 'features.N.weight'); check the arch or the file.{fits}"
        )
    if bad:
        raise error(
            f"weights {source!r} do not fit {spec.arch}: {'; '.join(bad[:4])}. "
            f"Check that the file is a {spec.arch} checkpoint (not vgg16 vs vgg19) in float.{fits}"
        )
    return state


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf: no export of them can give a finite distance."""
    bad = []
    for key in sorted(state):
        t = state[key]
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n = int((~finite).sum())
            first = tuple(int(i) for i in (~finite).nonzero()[0])
            bad.append(f"{key} ({n} of {t.numel()} values, first at index {first})")
    if bad:
        raise WeightsError(
            f"weights {source!r} hold NaN or Inf values in {len(bad)} tensor(s): {'; '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}. The checkpoint is damaged or came from a diverged "
            "training run; use another checkpoint (or re-download it)."
        )


def restrict(weights: Weights, spec: FeatureSpec) -> Weights:
    """``weights`` cut to the convolutions ``spec`` uses (a shallower spec of the same
    arch), with the hash recomputed over what remains."""
    state = {key: weights.state[key] for key, _ in _conv_keys(spec)}
    if len(state) == len(weights.state):
        return weights
    return Weights(state=state, source=weights.source, sha256=_digest(state))


def load_weights(spec: FeatureSpec) -> Weights:
    """The checked float32 convolution weights of ``spec`` up to its deepest layer.

    Raises WeightsError if they are missing, do not fit the arch, or hold NaN/Inf.
    """
    if spec.weights == "random":
        state = _random_state(spec)
        source = f"random(seed={spec.seed})"
    elif spec.weights == "imagenet":
        state = _check(spec, _download_imagenet(spec.arch), "imagenet")
        source = "imagenet"
    else:
        state = _check(spec, _read_file(spec.weights), spec.weights)
        source = os.path.abspath(spec.weights)
    check_finite(state, source)
    return Weights(state=state, source=source, sha256=_digest(state))


def checked_head_tensor(t: object, *, what: str, key: str, source: str, shape: tuple[int, ...],
                        error: type[Exception], shape_hint: str, file_fix: str,
                        negative_fix: str, digest: "hashlib._Hash") -> torch.Tensor:
    """One learned head's weight (LPIPS' linear layers, DISTS' alpha/beta) checked and hashed.

    Accepted: a float tensor of ``shape``, finite and >= 0. Returns it as contiguous
    float32 and adds ``key`` and its bytes to ``digest``. ``what`` names the head in
    messages ("LPIPS", "DISTS"); the hints say what to do for that head's files.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise error(f"{what} weight {key} in {source!r} is {kind}; accepted: a float tensor of "
                    f"shape {shape}. Re-save the file with float tensors.")
    if tuple(t.shape) != shape:
        raise error(f"{what} weight {key} in {source!r} has shape {tuple(t.shape)}; accepted: "
                    f"{shape} {shape_hint}")
    t = t.detach().to(torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise error(f"{what} weight {key} in {source!r} holds NaN or Inf; accepted: finite values "
                    f">= 0. The file is damaged: {file_fix}")
    if (t < 0).any():
        raise error(f"{what} weight {key} in {source!r} has negative values (min "
                    f"{float(t.min()):.3g}); accepted: values >= 0. {negative_fix}")
    digest.update(key.encode())
    digest.update(t.numpy().tobytes())
    return t
