"""The embedding stage of a distance matrix on Ray Data (``matrix --ray``, docs/scale.md).

Decode tasks (CPU) -> one Engine per actor (one per GPU, or CPU actors sharing the
cores) computing the embeddings of runtime/matrix.py -> the driver, which writes
them into its EmbeddingStore (in memory or spilled) as batches arrive. The GEMM
blocks then run on the driver, on its engine's device: one GPU node multiplies what
the cluster embedded. The decoding and the embedding formulas are the
single-machine command's (cli/imageset.py, runtime/embed.py), so the embeddings are
the same whichever path made them.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import ImageError
from .job_plan import _model_handle, plan_resources
from .ray_setup import _quiet_data_context, import_ray, start_ray
from .stages import local_model_copy


def decode_images(batch: dict[str, np.ndarray], *, size: tuple[int, int], policy: str,
                  input_range: str, max_pixels: int | None) -> dict[str, Any]:
    """Columns i, path, error -> i, error, x (k, 3, H, W) float32 (zeros where decoding failed)."""
    from ..datasets.imageset import Loader

    loader = Loader(tuple(size), policy, input_range, max_pixels, workers=1)
    xs, errors = [], []
    for path, err in zip(batch["path"], batch["error"]):
        x = np.zeros((3, *size), np.float32)
        if not err:
            try:
                x = loader.one(str(path))
            except ImageError as exc:
                err = str(exc)
        xs.append(x)
        errors.append(str(err))
    return {"i": batch["i"], "error": np.array(errors, dtype=object), "x": np.stack(xs)}


class EmbedActor:
    """One Engine and its Embedder per actor; a batch of images -> their embeddings."""

    def __init__(self, model: Any, *, device: str = "auto", threads: int | None = None) -> None:
        from ..runtime import Engine
        from ..runtime.matrix import Embedder

        if not isinstance(model, str):
            ref, sha = model
            if not isinstance(ref, bytes):
                import ray

                ref = ray.get(ref)
            model = local_model_copy(ref, sha)
        # Embeddings run in f32 (runtime/matrix.py): no bf16 check for an OpenVINO engine.
        self.engine = Engine(model, device, threads=threads,
                             **({"precision": "f32"} if device == "openvino" else {}))
        self.embed = Embedder.of(self.engine)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        x = np.asarray(batch["x"], np.float32)
        dims = self.embed.dims(x.shape[2], x.shape[3])
        out: dict[str, Any] = {"i": batch["i"], "error": batch["error"]}
        got = self.embed(x[ok]) if ok.any() else {}
        for t, d in dims.items():
            full = np.zeros((len(x), d), np.float32)
            if ok.any():
                full[ok] = got[t]
            out[f"e:{t}"] = full
        return out


def fill_store_ray(model: str, st: Any, store: Any, loader: Any, batch: int, *,
                   address: str | None = None, device: str = "auto", actors: int | None = None,
                   progress: Callable[[int], None] | None = None,
                   say: Callable[[str], None] | None = None) -> None:
    """Embed the images of ``st`` (a cli.imageset.ImageSet) into ``store`` on Ray Data.

    loader: the cli.imageset.Loader whose size, policy and range the decode tasks apply.
    Images that cannot be read are marked failed in the store, as on one machine.
    """
    ray = import_ray()
    started = start_ray(address)
    try:
        _quiet_data_context()
        res = plan_resources(ray.cluster_resources(), actors=actors, num_gpus=None, device=device)
        if say is not None:
            say(f"Ray: {res.actors} embedding actor(s), {res.actor_cpus:g} CPU(s)"
                f"{' and one GPU' if res.actor_gpus else ''} each")
        items = [{"i": i, "path": p, "error": st.errors.get(i, "")} for i, p in enumerate(st.paths)]
        ds = ray.data.from_items(items).map_batches(
            decode_images, batch_size=batch, num_cpus=res.decode_cpus, batch_format="numpy",
            fn_kwargs=dict(size=loader.size, policy="center-crop" if loader.crop else "resize",
                           input_range=loader.input_range, max_pixels=loader.max_pixels))
        ds = ds.map_batches(
            EmbedActor, batch_size=batch, batch_format="numpy", concurrency=res.actors,
            num_cpus=res.actor_cpus, num_gpus=res.actor_gpus,
            fn_constructor_kwargs=dict(model=_model_handle(model, "auto"), device=device,
                                       threads=res.threads))
        for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
            idx = np.asarray(part["i"], dtype=np.int64)
            ok = np.array([not e for e in part["error"]], dtype=bool)
            if ok.any():
                store.put(idx[ok], {t: np.asarray(part[f"e:{t}"])[ok] for t in store.dims})
            for i, e in zip(idx[~ok], np.asarray(part["error"])[~ok]):
                store.fail(int(i), str(e))
            if progress is not None:
                progress(len(idx))
    finally:
        if started:
            ray.shutdown()
