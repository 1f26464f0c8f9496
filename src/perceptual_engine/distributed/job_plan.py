"""What a Ray job runs with: its model (given, or exported once on the driver, and
checked to compare two images), the resources its actors and decode tasks reserve, and
how the actors reach the model file (its path, or its bytes in the object store)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .. import kinds
from .._io import sha256_file
from ..errors import ConfigError, DeviceError, ModelError
from ..spec import FeatureSpec, LossConfig


def resolve_model(model: str | None, spec: FeatureSpec | None, loss: LossConfig | None, *,
                  dtype: str = "float32", cache_dir: str | None = None,
                  say: Callable[[str], None] | None = None) -> str:
    """The path of a distance model: ``model`` as given, or ``spec``/``loss`` exported once
    into the command line's model cache (on the driver, never per actor)."""
    from ..runtime import read_info

    if (model is None) == (spec is None):
        raise ConfigError("give model= (an exported distance model) or spec= (and loss=) to "
                          "export one; not both, not neither.")
    if model is None:
        from ..datasets.cache import ensure_model, models_dir

        entry = ensure_model(spec, loss or LossConfig.default_for(spec), dtype=dtype,
                             folder=models_dir(cache_dir), say=say)
        model = entry.path
    info = read_info(os.fspath(model))
    if not kinds.get(info.graph).compares:
        raise ModelError(f"{model!r} is a {info.graph} graph; distances need a model exported "
                         f"with {kinds.quoted(kinds.names(compares=True))} (export --graph "
                         f"{'|'.join(kinds.names(compares=True))}).")
    return os.path.abspath(os.fspath(model))


@dataclass(frozen=True)
class Resources:
    actors: int
    actor_cpus: float
    actor_gpus: int
    decode_cpus: float
    threads: int | None  # ONNX Runtime intra-op threads per actor (CPU actors)


def plan_resources(cluster: dict[str, float], *, actors: int | None, num_gpus: int | None,
                   device: str) -> Resources:
    """One actor per GPU when the cluster has GPUs. On CPUs, a quarter of the cores
    (at least one) is left to the decode tasks and the actors share the rest.

    Decode tasks never reserve what an actor reserves: Ray Data fuses a task stage into
    the next actor stage when their resources are equal, and decoding would then run
    inside the actors instead of beside them.
    """
    cpus, gpus = float(cluster.get("CPU", 1.0)), int(cluster.get("GPU", 0))
    if num_gpus is None:
        num_gpus = 1 if gpus and device not in ("cpu", "openvino") else 0
    if num_gpus not in (0, 1):
        raise ConfigError(f"num_gpus={num_gpus}; accepted: 0 or 1 (one Engine per GPU).")
    if device in ("cuda", "tensorrt") and not (gpus and num_gpus):
        raise DeviceError(f"device {device!r} was asked for, but the Ray cluster has {gpus} GPU(s) "
                          f"and num_gpus={num_gpus}; add GPU nodes, or use device='cpu'.")
    if num_gpus:
        n = actors or gpus
        if n > gpus:
            raise ConfigError(f"{n} actor(s) with one GPU each, but the Ray cluster has {gpus} "
                              "GPU(s); ask for at most that many actors.")
        return Resources(n, 1.0, 1, 1.0, None)
    spare = max(1.0, float(int(cpus) // 4)) if cpus >= 2 else cpus / 2
    n = actors or max(1, int(cpus) // 4)
    per = (cpus - spare) / n
    if per < 0.5:
        raise ConfigError(f"{n} CPU actor(s) on a Ray cluster of {cpus:g} CPUs, {spare:g} of them "
                          f"left to decoding, is under half a core per actor; ask for at most "
                          f"{max(1, int(2 * (cpus - spare)))} actor(s).")
    return Resources(n, per, 0, 0.25, max(1, int(per)))


def _model_handle(path: str, share: str):
    """How actors reach the model: its path (one node, or a shared filesystem) or its bytes
    in the object store (put once; each node copies it to a local file once)."""
    import ray

    if share not in ("auto", "path", "object-store"):
        raise ConfigError(f"share={share!r}; accepted: auto, path, object-store.")
    if share == "auto":
        here = ray.util.get_node_ip_address()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        share = "path" if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == here \
            else "object-store"
    if share == "path":
        return path
    with open(path, "rb") as fh:
        return (ray.put(fh.read()), sha256_file(path))
