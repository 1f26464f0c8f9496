"""The three workloads the benchmark times, their inputs, FLOPs and reference.

- ``features``: the features of x at every layer of the spec (to relu4_4 by default).
- ``distance``: the distance of an (x, y) pair, content + style terms; both images
  run through the network, so a pair costs twice an image.
- ``style``: style distance of x to one cached target (its Grams computed once);
  only x runs per call.
- ``lpips``: LPIPS of an (x, y) pair in [-1, 1] (VGG16 to relu5_3, whatever the run's
  arch and layers); its PyTorch baseline is the lpips package's own ``LPIPS(net='vgg')``
  with the run's trunk weights copied in, so every variant is checked against lpips.
- ``dists``: DISTS of an (x, y) pair in [0, 1] (VGG16 with L2 pooling to relu5_3); its
  PyTorch baseline is the authors' ``DISTS_pytorch.DISTS`` with the run's trunk weights.
- ``metrics``: an evaluation loop's ``update(x, y)`` of LPIPS (VGG16, [-1, 1]): the
  baseline is torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` (the run's trunk);
  the engine side is the LPIPS model's ``Engine.distance``, which is what
  ``perceptual_engine.metrics.LPIPS.update`` runs (plus a sum).
- ``train``: the distance of an (x, y) pair and its gradient with respect to x
  (bench/training.py); the engine runs a distance graph exported with ``grad``.
- ``stylize-step``: one step of image optimization, batch 1: x against a cached
  content target and style target, value and gradient (a target graph with ``grad``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .. import layers as _layers
from ..errors import ConfigError
from ..spec import FeatureSpec, LossConfig
from .flops import gram_flops

WORKLOADS = ("features", "distance", "style", "train", "stylize-step", "lpips", "dists", "metrics",
             "lpips-alex", "lpips-squeeze")


@dataclass(frozen=True)
class Workload:
    """One kind of call: what it computes, its unit and its model graph."""

    name: str
    unit: str  # "images/s" | "pairs/s"
    graph: str  # the export_onnx graph kind that serves it
    description: str
    grad: bool = False  # also computes ∂total/∂x (the model is exported with grad)
    batches: tuple[int, ...] | None = None  # fixed batch sizes (None: the config's)
    net: str | None = None  # the lpips workloads: LPIPS' net (lpips/nets.py), against LPIPS(net=...)

    @property
    def pairs(self) -> bool:
        """It compares an (x, y) pair (distance, the LPIPS and DISTS workloads, metrics)."""
        return self.name in ("distance", "dists", "metrics") or self.net is not None

    def spec_for(self, spec: FeatureSpec) -> FeatureSpec:
        """The network the workload runs: the run's, except LPIPS (its net's trunk and taps,
        [-1, 1]; the metrics workload's is VGG16) and DISTS."""
        if self.name == "dists":
            from ..dists import default_spec as dists_spec

            return dists_spec(spec.weights, seed=spec.seed)
        if self.net is None and self.name != "metrics":
            return spec
        from ..lpips import default_spec

        return default_spec(spec.weights if spec.weights in ("imagenet", "random") or self.net in (None, "vgg")
                            else "random", net=self.net or "vgg", seed=spec.seed, input_range="-1,1")

    def loss(self, spec: FeatureSpec) -> LossConfig | None:
        """The loss the workload computes (None for features and lpips)."""
        if self.name in ("features", "dists", "metrics") or self.net is not None:
            return None
        style = {name: 1.0 for name in spec.layers}
        if self.name == "style":
            return LossConfig(style=style)
        # train and stylize-step: the distance workload's loss, with its gradient.
        # Johnson et al.'s content layer (relu2_2), else the spec's first layer.
        content = spec.layers[1] if len(spec.layers) > 1 else spec.layers[0]
        return LossConfig(content={content: 1.0}, style=style)

    def flops_per_item(self, spec: FeatureSpec, size: int) -> int:
        """FLOPs of one image (features, style) or one pair (distance) at size²:
        convolutions to the deepest layer, plus the Gram products of style terms.
        A gradient with respect to x is counted as one more pass of x (the input
        gradient of a convolution costs what its forward does; no weight gradient)."""
        conv = _layers.conv_flops(spec.arch, spec.deepest, size, size)
        loss = self.loss(spec)
        grams = gram_flops(spec.arch, loss.style, size, size) if loss else 0
        if self.pairs:
            return 2 * (conv + grams)  # x and y both run (LPIPS' and DISTS' heads are negligible)
        if self.name == "train":
            return 3 * (conv + grams)  # x and y forward, x backward
        if self.name == "stylize-step":
            return 2 * (conv + grams)  # x forward and backward; targets cached
        return conv + grams  # style: the target's Grams are cached


REGISTRY: dict[str, Workload] = {
    "features": Workload("features", "images/s", "features",
                         "features of x at every spec layer"),
    "distance": Workload("distance", "pairs/s", "distance",
                         "content + style distance of an (x, y) pair"),
    "style": Workload("style", "images/s", "style",
                      "style distance of x to a cached target"),
    "lpips": Workload("lpips", "pairs/s", "lpips",
                      "LPIPS (VGG16, lpips v0.1 weights) of an (x, y) pair in [-1, 1]", net="vgg"),
    "lpips-alex": Workload("lpips-alex", "pairs/s", "lpips",
                           "LPIPS (AlexNet, lpips v0.1 weights) of an (x, y) pair in [-1, 1]", net="alex"),
    "lpips-squeeze": Workload("lpips-squeeze", "pairs/s", "lpips",
                              "LPIPS (SqueezeNet 1.1, lpips v0.1 weights) of an (x, y) pair in [-1, 1]",
                              net="squeeze"),
    "dists": Workload("dists", "pairs/s", "dists",
                      "DISTS (VGG16 with L2 pooling, DISTS_pytorch weights) of an (x, y) pair in [0, 1]"),
    "metrics": Workload("metrics", "pairs/s", "lpips",
                        "LPIPS metric update(x, y) of an evaluation loop, images in [-1, 1] "
                        "(baseline: torchmetrics' LPIPS)"),
    "train": Workload("train", "pairs/s", "distance",
                      "distance of an (x, y) pair and its gradient with respect to x", grad=True),
    "stylize-step": Workload("stylize-step", "images/s", "target",
                             "x against cached content and style targets, value and gradient "
                             "(one step of stylize)", grad=True, batches=(1,)),
}


def get(name: str) -> Workload:
    if name not in REGISTRY:
        raise ConfigError(f"workload {name!r} is not accepted; accepted: {', '.join(REGISTRY)}.")
    return REGISTRY[name]


@dataclass
class Case:
    """One measured point: a workload at one size and batch, with its input sets.

    ``sets[i]`` is {"x": (B, 3, S, S)} or {"x", "y"} float32 in [0, 1]; ``target``
    is the style target (1, 3, S, S) of the style and stylize-step workloads,
    ``content_target`` the content target (1, 3, S, S) of stylize-step.
    """

    workload: Workload
    spec: FeatureSpec
    loss: LossConfig | None
    size: int
    batch: int
    sets: list[dict[str, np.ndarray]]
    target: np.ndarray | None
    content_target: np.ndarray | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.workload.name, self.size, self.batch)


def make_case(workload: Workload, spec: FeatureSpec, size: int, batch: int, *,
              n_sets: int, seed: int) -> Case:
    """Seeded random images (never zeros), one array per input and set."""
    spec = workload.spec_for(spec)
    if size < spec.min_size:
        raise ConfigError(f"size {size} is smaller than {spec.deepest} needs ({spec.min_size}); "
                          "give a larger --sizes or a shallower --layers.")
    rng = np.random.default_rng([seed, size, batch, WORKLOADS.index(workload.name)])
    names = ("x", "y") if workload.pairs or workload.name == "train" else ("x",)
    shape = (batch, 3, size, size)
    sets = [{n: rng.random(shape, dtype=np.float32) for n in names} for _ in range(n_sets)]
    if workload.net is not None or workload.name == "metrics":  # lpips' convention: images in [-1, 1]
        sets = [{n: 2.0 * a - 1.0 for n, a in s.items()} for s in sets]
    one = (1, 3, size, size)
    target = rng.random(one, dtype=np.float32) if workload.name in ("style", "stylize-step") else None
    content = rng.random(one, dtype=np.float32) if workload.name == "stylize-step" else None
    return Case(workload, spec, workload.loss(spec), size, batch, sets, target, content)


# -- the PyTorch side: one builder and one call for every torch variant --------

def torch_model(case: Case, weights: Any):
    """The PyTorch reference module that computes ``case``'s workload (float32, CPU)."""
    from ..reference import TorchFeatures, TorchPerceptualLoss

    if case.workload.name == "features":
        return TorchFeatures(case.spec, weights=weights)
    if case.workload.net is not None:
        from .lpips_baseline import LpipsPackage

        return LpipsPackage(weights, net=case.workload.net)
    if case.workload.name == "dists":
        from .dists_baseline import DistsPackage

        return DistsPackage(weights)
    if case.workload.name == "metrics":
        from .dists_baseline import TorchmetricsLpips

        return TorchmetricsLpips(weights)
    return TorchPerceptualLoss(case.spec, case.loss, weights=weights)


def torch_call(case: Case, model: Any, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """One call of the reference module on ``feeds`` (torch tensors)."""
    if case.workload.pairs:
        return model(feeds["x"], feeds["y"])
    return model(feeds["x"])  # features, or style against the cached target


def to_numpy(outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Outputs (numpy arrays or torch tensors on any device) as float64 numpy."""
    out = {}
    for k, v in outputs.items():
        if isinstance(v, np.ndarray):
            out[k] = v.astype(np.float64)
        else:
            out[k] = v.detach().float().cpu().numpy().astype(np.float64)
    return out


def max_rel_error(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                  skip: tuple[str, ...] = ("grad.x",)) -> float:
    """Largest, over the reference's outputs but ``skip``, of max |a − b| / max |b|
    (verify.compare). grad.x is judged apart (``grad_rel_error``).

    Extra outputs of ``actual`` (a style graph's Grams) are ignored; a missing or
    misshapen output, or a non-finite value, counts as infinite error.
    """
    from ..export.verify import compare

    worst = 0.0
    for name, ref in expected.items():
        if name in skip:
            continue
        got = actual.get(name)
        if got is None or np.shape(got) != np.shape(ref):
            return float("inf")
        worst = max(worst, compare(got, ref).max_rel)
    return worst


def grad_rel_error(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                   forgive: float) -> float | None:
    """grad.x's max |a − b| / max |b| once the ``forgive`` fraction of elements with the
    largest errors is left out (sparse max-pool/ReLU reroutes, tiers.py); None
    when the reference has no gradient, inf when it is missing or not finite."""
    from ..export.verify import compare

    if "grad.x" not in expected:
        return None
    got = actual.get("grad.x")
    if got is None or np.shape(got) != np.shape(expected["grad.x"]):
        return float("inf")
    return compare(got, expected["grad.x"], forgive).max_rel


class ModelCache:
    """Exports each (graph, dtype) once, lazily, into ``folder``; records each export."""

    def __init__(self, folder: str, weights: Callable[[Any], Any], say: Callable[[str], None]) -> None:
        self.folder, self.weights, self.say = folder, weights, say
        self.paths: dict[tuple[str, ...], str] = {}
        self.records: list[dict[str, Any]] = []

    def __call__(self, case: Case, dtype: str) -> str:
        """The model for ``case`` in ``dtype``: from the cache (hash-checked, locked,
        keyed by spec, loss, graph, dtype, weights file and version) or exported now."""
        from ..datasets.cache import ensure_model

        graph, loss, grad = case.workload.graph, case.loss, case.workload.grad
        key = (graph, dtype, case.spec, loss, grad)
        if key not in self.paths:
            entry = ensure_model(case.spec, loss, dtype=dtype, graph=graph, folder=self.folder,
                                 weights=self.weights(case.spec), say=self.say,
                                 **({"grad": True} if grad else {}))
            errors = [e["max_rel"] for e in entry.errors.values()]
            self.records.append({"graph": graph, "grad": grad, "dtype": dtype, "path": entry.path,
                                 "seconds": entry.seconds, "cached": not entry.built,
                                 "verify_max_rel_error": max(errors) if errors else None})
            self.paths[key] = entry.path
        return self.paths[key]
