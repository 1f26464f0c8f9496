"""Output names of the learned heads' graphs, in order: torch-free, so that reading a
model's metadata (export/metadata.py) and building the graphs (lpips/, dists/) share
one definition without the metadata importing torch.
"""
from __future__ import annotations


def lpips_output_names(layers: tuple[str, ...], spatial: bool = False) -> tuple[str, ...]:
    """Outputs of an LPIPS graph, in order: ``lpips.<l>`` per tap, ``total``, [``spatial``]."""
    return tuple(f"lpips.{n}" for n in layers) + ("total",) + (("spatial",) if spatial else ())


def dists_output_names(layers: tuple[str, ...]) -> tuple[str, ...]:
    """Outputs of a DISTS graph, in order: ``texture.<s>`` then ``structure.<s>`` per stage
    (``input``, then the taps ``layers``), then ``total``; each term is that stage's share
    of the distance, so they sum to ``total``."""
    stages = ("input",) + tuple(layers)
    return tuple(f"texture.{s}" for s in stages) + tuple(f"structure.{s}" for s in stages) + ("total",)
