"""Dataset-scale distances on Ray Data (the optional extra ``perceptual-engine[ray]``).

CPU tasks decode the images with the command line's rules, an actor pool holds one
``Engine`` per actor (one actor per GPU when the cluster has GPUs), and the rows are
exactly those of ``perceptual-engine distance``: both paths, every term, total, or the
pair's error. Ray is imported only when a function here is called.

    from perceptual_engine.distributed import distances, write_distances
    ds = distances("refs/", "outputs/", spec=spec, loss=loss)    # a ray.data.Dataset of rows
    stats = write_distances("refs/", "outputs/", model="vgg19-distance.onnx",
                            output="scores.parquet", resume=True)
"""
from __future__ import annotations

from .job import distances, write_distances

__all__ = ["distances", "write_distances"]
