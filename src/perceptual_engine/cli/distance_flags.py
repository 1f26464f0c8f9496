"""``distance``'s flags, and which model they ask for: one table and one resolver for
both the single-process path and the Ray path (``--ray``).

Every option of the ``distance`` subparser has a row in ``FLAGS`` saying how each
path treats it: ``HONOURED``, or the one-line reason it is refused on that path. A
refused flag given on the command line ends the run before any work (ConfigError,
exit 2). A test enumerates the subparser's options against this table, so a new
flag cannot be dropped silently by one of the paths.

``model_request`` turns the model flags (``--model``, ``--graph``, the spec flags,
``--lpips-weights``, ``--spatial-dir``) into what both paths then load or export;
``check_model`` compares a model's recorded graph kind (metadata, read without
torch) with what the flags ask for.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from .. import kinds
from ..errors import ConfigError, ModelError
from .options import SPEC_FLAGS, head_kwargs, head_spec_from_args, spec_from_args

HONOURED = "honoured"
SINGLE, RAY = "single", "ray"
_BOTH = {SINGLE: HONOURED, RAY: HONOURED}
_RAY_ONLY = ("--ray-address and --ray-actors go with --ray (they choose the Ray cluster and "
             "its Engine actors); add --ray, or drop them.")

# dest -> {path: HONOURED or why the path refuses the flag}.
FLAGS: dict[str, dict[str, str]] = {
    "a": _BOTH, "b": _BOTH, "pairs": _BOTH,
    "model": _BOTH, "graph": _BOTH, "spatial_dir": _BOTH, "lpips_weights": _BOTH,
    "dists_weights": _BOTH,
    **{f.dest: _BOTH for k in kinds.KINDS.values() for f in k.flags},  # --lpips-net
    "cache_dir": _BOTH, "device": _BOTH, "precision": _BOTH, "batch_size": _BOTH, "size_policy": _BOTH,
    "output": _BOTH, "resume": _BOTH, "format": _BOTH, "max_pixels": _BOTH,
    "memory_budget": _BOTH, "max_side": _BOTH,
    **{f: _BOTH for f in SPEC_FLAGS},  # arch, layers, weights, seed, ..., dtype
    "workers": {SINGLE: HONOURED,
                RAY: "--workers sets the decoding threads of one process; with --ray, images are "
                     "decoded in Ray tasks spread over the cluster's CPUs. Drop --workers, or "
                     "drop --ray."},
    "ray": _BOTH,  # the switch between the two paths
    "ray_address": {SINGLE: _RAY_ONLY, RAY: HONOURED},
    "ray_actors": {SINGLE: _RAY_ONLY, RAY: HONOURED},
}


def check_flags(args: argparse.Namespace, path: str, defaults: dict[str, Any]) -> None:
    """ConfigError for the first flag ``path`` refuses that differs from its default."""
    for dest, how in FLAGS.items():
        reason = how[path]
        if reason != HONOURED and getattr(args, dest, None) != defaults.get(dest):
            raise ConfigError(reason)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


@dataclass(frozen=True)
class ModelRequest:
    """The model ``distance`` runs: ``model`` (a file given with --model) or the spec
    to export (``graph``, ``spec``, ``loss``, ``lpips_weights``, ``spatial``, ``dtype``,
    ``dists_weights``)."""

    model: str | None
    graph: str
    spec: Any = None
    loss: Any = None
    lpips_weights: str | None = None
    spatial: bool = False
    dtype: str = "float32"
    dists_weights: str | None = None
    command: str = "distance"  # for messages
    kind_filter: Any = None  # the kinds the command runs (kinds.names(**kind_filter)); None: compares

    def __post_init__(self) -> None:
        if self.kind_filter is None:
            object.__setattr__(self, "kind_filter", {"compares": True})

    def extra(self) -> dict[str, Any]:
        """The model cache's arguments for this graph's head (its weights; LPIPS' spatial map)."""
        kind = kinds.get(self.graph)
        if kind.head is None:
            return {}
        return {kind.weights_option: getattr(self, kind.weights_option),
                **({"spatial": self.spatial} if kind.spatial else {})}


def model_request(args: argparse.Namespace) -> ModelRequest:
    """What the model flags ask for; ConfigError for combinations that cannot hold."""
    spatial = args.spatial_dir is not None
    if args.model:
        heads = tuple(k.weights_option for k in kinds.KINDS.values() if k.head) \
            + tuple(f.dest for k in kinds.KINDS.values() for f in k.flags)
        given = [_flag(f) for f in SPEC_FLAGS + heads
                 if getattr(args, f, None) is not None]
        if given:
            raise ConfigError(f"--model reads the spec from the model; drop {', '.join(given)}, "
                              "or drop --model to export one from the flags.")
        return ModelRequest(model=args.model, graph=args.graph or "", spatial=spatial,
                            **getattr(args, "model_kinds", {}))
    graph = args.graph or "distance"
    head = head_kwargs(args, graph, spatial, "--spatial-dir")
    if kinds.get(graph).head:
        return ModelRequest(None, graph, head_spec_from_args(args, graph), None, dtype=args.dtype or "float32",
                            **head)
    from ..spec import LossConfig

    spec, loss = spec_from_args(args)
    return ModelRequest(None, "distance", spec, loss or LossConfig.default_for(spec),
                        dtype=args.dtype or "float32")


def check_model(req: ModelRequest, info: Any) -> None:
    """The model's recorded kind against the flags: --graph, distance's kinds, --spatial-dir."""
    name = req.model or "the model"
    if req.model and req.graph and info.graph != req.graph:
        raise ConfigError(f"--graph {req.graph} does not match --model {req.model!r}, a "
                          f"{info.graph} model (its metadata says so); drop --graph (the model "
                          f"says what it computes), or give a model exported with --graph "
                          f"{req.graph}.")
    # The kinds this command runs: matrix, nearest and dedup set ``kind_filter`` (matrix=True).
    command, where = getattr(req, "command", "distance"), getattr(req, "kind_filter", {"compares": True})
    accepted = kinds.names(**where)
    if info.graph not in accepted:  # the wrong file for the command: a usage error (exit 2)
        raise ConfigError(f"{name!r} is a {info.graph} graph; {command} needs a model exported "
                          f"with `perceptual-engine export --graph {'|'.join(accepted)}`.")
    if req.spatial and not getattr(info, "spatial", False):
        raise ConfigError(f"{name!r} has no spatial output; --spatial-dir needs an LPIPS model "
                         "exported with --spatial (or drop --model to export one).")


def check_model_file(req: ModelRequest) -> Any:
    """The ModelInfo of ``req.model`` (metadata only: no torch, no session), checked."""
    import os

    from ..runtime import read_info

    if not os.path.isfile(req.model):  # the Engine's own wording, before it is opened
        what = ("a folder" if os.path.isdir(req.model) else
                "not a regular file" if os.path.exists(req.model) else "missing")
        raise ModelError(f"model {req.model!r} is {what}; give the path of an exported .onnx "
                         "file (perceptual-engine export -o model.onnx).")
    info = read_info(req.model)
    check_model(req, info)
    return info


def ensure_model_file(req: ModelRequest, cache_dir: str | None,
                      say: Callable[[str], None]) -> str:
    """The path of the requested model: ``--model``, or exported once into the cache."""
    if req.model:
        check_model_file(req)
        return req.model
    from ..datasets.cache import ensure_model, models_dir

    entry = ensure_model(req.spec, req.loss, dtype=req.dtype, graph=req.graph,
                         folder=models_dir(cache_dir), say=say, **req.extra())
    if not entry.built:
        say(f"using the cached model {entry.path}")
    return entry.path
