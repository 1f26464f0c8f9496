"""What an exported model says about itself, in ONNX ``metadata_props``.

The Engine reads these so a user never repeats the spec. ``FORMAT_VERSION`` is
bumped whenever the meaning of a key changes; a reader refuses newer formats.
Format 2 adds ``grad`` (the model outputs ``grad.x``) and the ``target`` graph; a
model that uses neither is still written as format 1, so older readers keep
reading it, and format 1 files read as ``grad=False``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from ..errors import ModelError
from ..spec import FeatureSpec, LossConfig

FORMAT_VERSION = 2
PREFIX = "perceptual_engine."


@dataclass(frozen=True)
class ModelInfo:
    spec: FeatureSpec
    loss: LossConfig | None
    graph: str  # "features" | "distance" | "style" | "target"
    dtype: str  # "float32" | "float16"
    weights_source: str
    weights_sha256: str
    version: str
    format: int = FORMAT_VERSION
    grad: bool = False  # outputs grad.x (N, 3, H, W), ∂(Σ_n total_n)/∂x

    @property
    def input_names(self) -> tuple[str, ...]:
        if self.graph == "features":
            return ("x",)
        if self.graph == "distance":
            return ("x", "y")
        content = tuple(f"target.content.{n}" for n in self.loss.content) if self.graph == "target" else ()  # type: ignore[union-attr]
        return ("x",) + content + tuple(f"target.{g}" for g in self.gram_names)

    @property
    def gram_names(self) -> tuple[str, ...]:
        """x's Gram outputs ``gram.<l>`` of a style or target graph; its target inputs are ``target.gram.<l>``."""
        if self.graph not in ("style", "target") or self.loss is None:
            return ()
        return tuple(f"gram.{n}" for n in self.loss.style)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """x's content-layer feature outputs ``feature.<l>`` of a target graph (to cache a content target)."""
        if self.graph != "target" or self.loss is None:
            return ()
        return tuple(f"feature.{n}" for n in self.loss.content)

    @property
    def term_names(self) -> tuple[str, ...]:
        """What ``Engine.distance`` returns: the loss terms, total, and ``grad.x`` if present."""
        if self.loss is None:
            return ()
        return self.loss.output_names() + (("grad.x",) if self.grad else ())

    @property
    def output_names(self) -> tuple[str, ...]:
        if self.graph == "features" or self.loss is None:
            return tuple(self.spec.layers)
        return self.term_names + self.feature_names + self.gram_names

    def to_props(self) -> dict[str, str]:
        fmt = self.format if (self.grad or self.graph == "target") else 1
        props = {
            PREFIX + "format": str(fmt),
            PREFIX + "spec": json.dumps(self.spec.to_dict(), sort_keys=True),
            # Key order kept: it is the order of the graph's inputs and outputs.
            PREFIX + "loss": json.dumps(self.loss.to_dict() if self.loss else None),
            PREFIX + "graph": self.graph,
            PREFIX + "dtype": self.dtype,
            PREFIX + "weights_source": self.weights_source,
            PREFIX + "weights_sha256": self.weights_sha256,
            PREFIX + "version": self.version,
        }
        if fmt >= 2:
            props[PREFIX + "grad"] = "true" if self.grad else "false"
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], path: str) -> "ModelInfo":
        if PREFIX + "format" not in props:
            raise ModelError(
                f"{path} is an ONNX model without perceptual-engine metadata; accepted: a model "
                "written by perceptual_engine.export_onnx (or `perceptual-engine export`). "
                "Export one from a FeatureSpec."
            )
        try:
            fmt = int(props[PREFIX + "format"])
        except ValueError:
            fmt = -1
        if fmt > FORMAT_VERSION or fmt < 1:
            raise ModelError(
                f"{path} has metadata format {props[PREFIX + 'format']!r}; this version of "
                f"perceptual-engine reads formats 1 to {FORMAT_VERSION}. Upgrade perceptual-engine "
                "or re-export the model with this version."
            )
        try:
            spec = FeatureSpec.from_dict(json.loads(props[PREFIX + "spec"]))
            loss_d = json.loads(props.get(PREFIX + "loss", "null"))
            return cls(
                spec=spec,
                loss=LossConfig.from_dict(loss_d) if loss_d else None,
                graph=props[PREFIX + "graph"],
                dtype=props[PREFIX + "dtype"],
                weights_source=props.get(PREFIX + "weights_source", ""),
                weights_sha256=props.get(PREFIX + "weights_sha256", ""),
                version=props.get(PREFIX + "version", ""),
                format=fmt,
                grad={"true": True, "false": False}[props.get(PREFIX + "grad", "false")],
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(
                f"{path} has damaged perceptual-engine metadata ({type(exc).__name__}: {exc}); "
                "re-export the model."
            ) from exc
