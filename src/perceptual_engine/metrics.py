"""Evaluation-loop metrics: ``LPIPS``, ``DISTS`` and ``Perceptual`` as torchmetrics ``Metric``s.

Each is backed by an exported model on an ``Engine``, opened on the device of the
tensors given to ``update`` (CPU tensors: ONNX Runtime CPU; CUDA tensors: CUDA on that
GPU, zero copy). The state is a sum of per-sample scores and a count, both reduced
with ``dist_reduce_fx="sum"``, so DDP synchronises them as torchmetrics does its own.
``compute()`` is their mean (``reduction="mean"``) or sum (``"sum"``).

A ``MetricCollection`` merges metrics whose states look equal after the first update
(compute groups). Each class names its states after itself (``lpips_sum``,
``lpips_count``, ...) and holds a third state, ``<name>_model``: the SHA-256 of its
model's sealed metadata (graph digest included). Two metrics are merged only if they
compute the same thing from the same model.

    from perceptual_engine.metrics import LPIPS
    metric = LPIPS(normalize=True)            # images in [0, 1]
    for x, y in loader:
        metric.update(x, y)
    value = metric.compute()

Without ``model`` the model is exported once into the model cache (as the command
line does); with ``model`` an exported ONNX file is used and its metadata says what
it computes. Needs torchmetrics (``pip install perceptual-engine[torchmetrics]``);
this module is the only one that imports it.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .errors import ConfigError, ModelError

try:
    from torchmetrics import Metric
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError(
        "perceptual_engine.metrics needs torchmetrics: pip install perceptual-engine[torchmetrics]"
    ) from exc

REDUCTIONS = ("mean", "sum")


class _EngineMetric(Metric):
    """Sum of per-sample ``total`` and a count; one Engine per device, opened on first use."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    graph = ""  # the graph kind a model must have
    state_prefix = ""  # the names of this class's states: <prefix>_sum, _count, _model

    def __init__(self, model: str | os.PathLike | None, reduction: str, *, dtype: str = "float32",
                 cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction {reduction!r} is not accepted; accepted: "
                              f"{', '.join(map(repr, REDUCTIONS))}.")
        self.reduction = reduction
        self.model_path = os.fspath(model) if model is not None else self._build(dtype, cache_dir)
        self._engines: dict[str, Any] = {}
        info = self.info
        if info.graph != self.graph:
            raise ModelError(f"{self.model_path!r} is a {info.graph} graph; {type(self).__name__} "
                             f"needs one exported with graph={self.graph!r}.")
        # Names of this class only, and the model's identity as a state: torchmetrics'
        # compute groups merge metrics whose states have equal names and values, so
        # different metrics (or one metric on two models) must never look alike.
        p = self.state_prefix
        self._sum, self._count = f"{p}_sum", f"{p}_count"
        self.add_state(self._sum, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(self._count, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(f"{p}_model", default=model_identity(info), dist_reduce_fx="max")

    # -- the model ----------------------------------------------------------------
    def _build(self, dtype: str, cache_dir: str | None) -> str:
        # The model cache lives with the command line today; imported here, on first use.
        from .datasets.cache import ensure_model, models_dir

        spec, loss, extra = self._model_request()
        entry = ensure_model(spec, loss, dtype=dtype, folder=models_dir(cache_dir), **extra)
        return entry.path

    def _model_request(self) -> tuple[Any, Any, dict[str, Any]]:
        raise NotImplementedError

    @property
    def info(self):
        """The model's metadata (ModelInfo): spec, graph kind, outputs."""
        from .runtime import read_info

        return read_info(self.model_path)

    def _engine(self, device: torch.device):
        key = str(device)
        if key not in self._engines:
            from .runtime import Engine
            from .runtime.providers import ProviderOptions

            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                engine = Engine(self.model_path, "cuda", options=ProviderOptions(device_id=index))
            elif device.type == "cpu":
                engine = Engine(self.model_path, "cpu")
            else:
                raise ConfigError(f"{type(self).__name__} runs on CPU or CUDA tensors; got tensors on "
                                  f"{device}. Move them with .cpu() or .cuda().")
            self._engines[key] = engine
        return self._engines[key]

    def __getstate__(self) -> dict[str, Any]:
        # Engines (ONNX Runtime sessions) neither pickle nor deep-copy: a copy (clone(),
        # a DDP spawn) reopens them on first use.
        # The spec and loss were only needed to build the model (LossConfig's read-only
        # mappings do not deep-copy either).
        state = dict(super().__getstate__())
        state["_engines"] = {}
        state.pop("_spec", None)
        state.pop("_loss", None)
        return state

    # -- torchmetrics -------------------------------------------------------------
    def scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample ``total`` (N,) float32 on x's device, without touching the state."""
        engine = self._engine(x.device)
        x, y = (t.detach().to(torch.float32).contiguous() for t in (x, y))
        if x.device.type == "cpu":
            out = engine.distance(x.numpy(), y.numpy())["total"]
            return torch.from_numpy(out)
        return engine.distance(x, y)["total"]

    @property
    def score_sum(self) -> torch.Tensor:
        """The sum of per-sample scores so far (float64)."""
        return getattr(self, self._sum)

    @property
    def count(self) -> torch.Tensor:
        """The number of samples so far."""
        return getattr(self, self._count)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:  # type: ignore[override]
        s = self.scores(x, y)
        total = self.score_sum
        setattr(self, self._sum, total + s.to(total.device, torch.float64).sum())
        setattr(self, self._count, self.count + s.shape[0])

    def compute(self) -> torch.Tensor:
        total = self.score_sum.to(torch.float32)
        return total / self.count if self.reduction == "mean" else total


def model_identity(info: Any) -> torch.Tensor:
    """(32,) uint8: SHA-256 of a model's sealed metadata, which binds its claims (graph
    kind, spec, input range, head weights) to its graph digest. No two differing bytes
    are ``allclose``, so compute groups never merge metrics on different models."""
    import hashlib
    import json

    text = json.dumps(sorted(info.to_props().items()), separators=(",", ":"))
    return torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8).clone()


class LPIPS(_EngineMetric):
    """LPIPS (lpips v0.1), as torchmetrics' ``LearnedPerceptualImagePatchSimilarity(
    net_type=...)``: images in [-1, 1], or [0, 1] with ``normalize=True``.

    net_type: "vgg" (VGG16), "alex" (AlexNet) or "squeeze" (SqueezeNet 1.1), torchmetrics'
        argument; None: the model's net, or "vgg" when exporting (torchmetrics defaults to
        "alex": pass net_type="alex" for its default).
    model: an LPIPS model (``export --graph lpips``); its input range must match
        ``normalize`` and its net ``net_type``. Without it one is exported into the cache
        from ``weights`` (the net's trunk: "imagenet", "random" or a file) and ``lpips_weights``.
    """

    graph = state_prefix = "lpips"

    def __init__(self, model: str | os.PathLike | None = None, *, net_type: str | None = None,
                 normalize: bool = False, reduction: str = "mean", weights: str = "imagenet",
                 lpips_weights: Any = None, dtype: str = "float32", cache_dir: str | None = None,
                 **kwargs: Any) -> None:
        from .lpips import nets as lpips_nets

        if net_type is not None:
            lpips_nets.get(net_type)
        self.normalize, self._weights, self._lpips_weights = bool(normalize), weights, lpips_weights
        self._net_type = net_type or lpips_nets.DEFAULT
        super().__init__(model, reduction, dtype=dtype, cache_dir=cache_dir, **kwargs)
        want = "0,1" if self.normalize else "-1,1"
        if self.info.spec.input_range != want:
            raise ConfigError(f"{self.model_path!r} takes images in [{self.info.spec.input_range}], but "
                              f"normalize={self.normalize} means [{want}]; pass "
                              f"normalize={not self.normalize} or a model exported for [{want}].")
        found = lpips_nets.for_arch(self.info.spec.arch)
        if net_type is not None and found is not None and found.name != net_type:
            raise ConfigError(f"{self.model_path!r} is LPIPS on net {found.name!r}, not net_type={net_type!r}; "
                              f"pass net_type={found.name!r} (or None), or a model exported with "
                              f"--lpips-net {net_type}.")
        self.net_type = found.name if found is not None else self._net_type

    def _model_request(self):
        from . import lpips as L

        spec = L.default_spec(self._weights, net=self._net_type, input_range="0,1" if self.normalize else "-1,1")
        return spec, None, {"graph": "lpips", "lpips_weights": self._lpips_weights}


class DISTS(_EngineMetric):
    """DISTS, as torchmetrics' ``DeepImageStructureAndTextureSimilarity``: images in [0, 1].

    model: a DISTS model (``export --graph dists``). Without it one is exported into the
        cache from ``weights`` (the VGG16 trunk) and ``dists_weights`` (alpha/beta).
    """

    graph = state_prefix = "dists"

    def __init__(self, model: str | os.PathLike | None = None, *, reduction: str = "mean",
                 weights: str = "imagenet", dists_weights: Any = None, dtype: str = "float32",
                 cache_dir: str | None = None, **kwargs: Any) -> None:
        self._weights, self._dists_weights = weights, dists_weights
        super().__init__(model, reduction, dtype=dtype, cache_dir=cache_dir, **kwargs)

    def _model_request(self):
        from . import dists as D

        return D.default_spec(self._weights), None, {"graph": "dists", "dists_weights": self._dists_weights}


class Perceptual(_EngineMetric):
    """The content/style distance ``total`` of a distance model (``export --graph distance``).

    model: a distance model; or ``spec`` (FeatureSpec) and ``loss`` (LossConfig, default
        content terms of weight 1 on every layer) to export one into the cache.
    """

    graph, state_prefix = "distance", "perceptual"

    def __init__(self, model: str | os.PathLike | None = None, *, spec: Any = None, loss: Any = None,
                 reduction: str = "mean", dtype: str = "float32", cache_dir: str | None = None,
                 **kwargs: Any) -> None:
        if model is None and spec is None:
            raise ConfigError("Perceptual needs model=PATH (an exported distance model) or spec="
                              "FeatureSpec(...) (and optionally loss=LossConfig(...)) to export one.")
        self._spec, self._loss = spec, loss
        super().__init__(model, reduction, dtype=dtype, cache_dir=cache_dir, **kwargs)

    def _model_request(self):
        from .spec import LossConfig

        return self._spec, self._loss or LossConfig.default_for(self._spec), {"graph": "distance"}
