"""Reusable option groups of the command line: the FeatureSpec and LossConfig flags."""
from __future__ import annotations

import argparse
from typing import Any, Callable


def _layer_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give layer names separated by commas, e.g. relu1_2,relu2_2")
    return names


def _weight_map(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if name in out:
            raise argparse.ArgumentTypeError(
                f"{name} is given twice in {text!r}; name each layer once, e.g. {name}={value or 1}")
        try:
            out[name] = float(value) if sep else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not LAYER=WEIGHT; write e.g. relu2_2=1.0,relu3_4=0.5") from None
    if not out:
        raise argparse.ArgumentTypeError("give LAYER=WEIGHT pairs separated by commas")
    return out


def add_device_options(p: argparse.ArgumentParser, devices: tuple[str, ...]) -> None:
    p.add_argument("--device", choices=devices, default="auto",
                   help="auto: TensorRT, CUDA, else ONNX Runtime CPU fp32; cpu: ONNX Runtime, exact "
                        "fp32; openvino: OpenVINO on the CPU (perceptual-engine[openvino]; see "
                        "docs/openvino.md) (default: auto)")
    p.add_argument("--precision", choices=("auto", "f32", "bf16"), default="auto",
                   help="--device openvino: bf16 or f32; auto: bf16 where the CPU has it (f32 for "
                        "gradients). Other devices run fp32 (default: auto)")


def say_device(device: str, engine: Any, say: Callable[[str], None]) -> None:
    """Print what --device auto chose (and that OpenVINO is there to be asked for), and
    why --precision auto ran f32 on OpenVINO where it did."""
    if getattr(engine, "precision_note", ""):
        say(engine.precision_note)
    if device != "auto":
        return
    import importlib.util

    hint = ""
    if not engine.on_gpu and importlib.util.find_spec("openvino") is not None:
        hint = "; OpenVINO is installed: --device openvino runs bf16 where the CPU has it"
    say(f"--device auto runs {engine.providers[0]}{'' if engine.on_gpu else ' (fp32)'}{hint}")


def distance_threshold(text: str) -> float:
    """A distance threshold: a finite number >= 0 (NaN, Inf or a negative one would match
    nothing or everything, silently)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a distance >= 0, e.g. 0.01") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; accepted: a finite distance >= 0, "
                                         "e.g. 0.01")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


SPEC_FLAGS = ("arch", "layers", "weights", "seed", "input_range", "pooling", "content", "style",
              "gram", "dtype")


def add_spec_options(p: argparse.ArgumentParser, *, default_layers: str = "the arch's usual four",
                     default_pooling: str = "max", default_gram: str = "chw",
                     default_content: str = "weight 1 on every layer, when --style is not given "
                                             "either",
                     default_style: str | None = None) -> None:
    """The spec and loss flags; the ``default_*`` texts are the command's own defaults
    (a command that applies others passes them, so its --help shows what runs)."""
    from ..layers import ARCHS
    from ..spec import GRAM_NORMS, INPUT_RANGES, POOLINGS

    g = p.add_argument_group("model spec (FeatureSpec)")
    g.add_argument("--arch", choices=ARCHS, help="network (default: vgg19)")
    g.add_argument("--layers", type=_layer_list, metavar="L1,L2,...",
                   help="layers to extract, by paper name, e.g. relu1_2,relu2_2 (default: the "
                        f"layers --content/--style name, else {default_layers})")
    g.add_argument("--weights", metavar="imagenet|random|PATH",
                   help="ImageNet (torchvision download), seeded random, or a .pth/.safetensors "
                        "state dict (default: imagenet)")
    g.add_argument("--seed", type=int, help="seed of --weights random (default: 0)")
    g.add_argument("--input-range", choices=tuple(INPUT_RANGES), dest="input_range",
                   help="pixel range of the inputs (default: 0,1); write --input-range=-1,1")
    g.add_argument("--pooling", choices=POOLINGS, help="max (as trained), avg, or l2 (DISTS' L2 pooling) "
                   f"(default: {default_pooling})")
    g = p.add_argument_group("loss (LossConfig)")
    g.add_argument("--content", type=_weight_map, metavar="L=W,...",
                   help=f"content terms and weights, e.g. relu2_2=1.0 (default: {default_content})")
    g.add_argument("--style", type=_weight_map, metavar="L=W,...",
                   help="style (Gram) terms and weights, e.g. relu1_2=1,relu2_2=1"
                        + (f" (default: {default_style})" if default_style else ""))
    g.add_argument("--gram", choices=GRAM_NORMS,
                   help=f"Gram normalization: chw (Johnson), hw (Gatys), none (default: {default_gram})")
    g.add_argument("--dtype", choices=("float32", "float16"),
                   help="network precision; inputs, Grams and outputs stay float32 (default: float32)")


def spec_from_args(args: argparse.Namespace, *,
                   default_loss: Callable[[Any, str], Any] | None = None):
    """(FeatureSpec, LossConfig or None) from the spec flags.

    Without --layers, the layers are those --content/--style name (so the network is
    cut no deeper than needed), else the arch's usual four. Without --content and
    --style the loss is ``default_loss(spec, gram)`` (a command's own default), or
    None (export_onnx's default: content weight 1 on every layer).
    """
    from .. import layers as _layers
    from ..spec import FeatureSpec, LossConfig

    arch = args.arch or "vgg19"
    gram = args.gram or "chw"
    user_loss = args.content is not None or args.style is not None
    chosen = args.layers
    if chosen is None and user_loss:
        named = set(args.content or {}) | set(args.style or {})
        chosen = tuple(sorted(named, key=lambda n: _layers.resolve(arch, n).index))
    spec = FeatureSpec(arch=arch, layers=chosen, weights=args.weights or "imagenet",
                       seed=0 if args.seed is None else args.seed,
                       input_range=args.input_range or "0,1", pooling=args.pooling or "max")
    if user_loss:
        return spec, LossConfig(content=args.content or {}, style=args.style or {}, gram=gram)
    if default_loss is not None:
        return spec, default_loss(spec, gram)
    if args.gram:
        return spec, LossConfig(content={n: 1.0 for n in spec.layers}, gram=gram)
    return spec, None


def memory_budget(text: str) -> str:
    """--memory-budget: validated here (exit 2 on a bad value), parsed by the engine."""
    from ..errors import ConfigError
    from ..memory import parse_budget

    try:
        parse_budget(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_memory_options(p: argparse.ArgumentParser) -> None:
    from ..memory import DEFAULT_FRACTION

    g = p.add_argument_group("memory (docs/memory.md)")
    g.add_argument("--memory-budget", type=memory_budget, metavar="SIZE",
                   help="refuse a pair whose estimated peak memory exceeds SIZE, as an error row, "
                        "and size batches under it: 4G, 512M (binary units), 50%% of the "
                        f"available memory, or 0 for none (default: {100 * DEFAULT_FRACTION:.0f}%% of "
                        "the available memory, free GPU memory on CUDA)")
    g.add_argument("--max-side", type=positive_int, metavar="N",
                   help="downscale images whose longer side exceeds N pixels (aspect kept, "
                        "bicubic, antialiased) before the size policy (default: no limit)")


def add_head_options(p: argparse.ArgumentParser, *, spatial_flag: bool, **where: object) -> None:
    """One group per learned head (kinds.py), in registry order: its weights flag and,
    with ``spatial_flag``, --spatial for a head with a map. ``where`` picks the kinds
    (``matrix=True``: those with matrices)."""
    from .. import kinds

    for kind in kinds.KINDS.values():
        if kind.head is None or any(getattr(kind, a) != v for a, v in where.items()):
            continue
        g = p.add_argument_group(f"{kind.label} (--graph {kind.name})")
        g.add_argument(kind.weights_flag, metavar="PATH", dest=kind.weights_option, help=kind.weights_help)
        for flag in kind.flags:
            g.add_argument(flag.flag, choices=flag.choices, dest=flag.dest, help=flag.help)
        if spatial_flag and kind.spatial:
            g.add_argument("--spatial", action="store_true",
                           help="also output the per-pixel map 'spatial' (N, 1, H, W)")


def head_spec_from_args(args: argparse.Namespace, graph: str):
    """The FeatureSpec of a learned head's graph (kinds.py ``head``) from the spec flags:
    the head module's ``spec_from_flags``."""
    from .. import kinds

    return kinds.get(graph).module().spec_from_flags(args)


def head_kwargs(args: argparse.Namespace, graph: str, spatial: bool, spatial_flag: str) -> dict:
    """export_onnx's (and the model cache's) keyword arguments for ``graph``'s head from
    the flags: its weights file and, for LPIPS, the spatial map. ConfigError for another
    head's weights flag, or a spatial flag on a kind without a map."""
    from .. import kinds
    from ..errors import ConfigError

    kind = kinds.get(graph)
    for other in kinds.KINDS.values():
        if other.head and other is not kind and getattr(args, other.weights_option, None) is not None:
            raise ConfigError(f"{other.weights_flag} is an option of --graph {other.name}; add --graph "
                              f"{other.name}, or drop it.")
        for flag in other.flags if other is not kind else ():
            if getattr(args, flag.dest, None) is not None:
                raise ConfigError(f"{flag.flag} is an option of --graph {other.name}; add --graph "
                                  f"{other.name}, or drop it.")
    if spatial and not kind.spatial:
        maps = "|".join(kinds.names(spatial=True))
        raise ConfigError(f"{spatial_flag} writes LPIPS maps, one of the options of --graph {maps}; add --graph "
                          f"{maps} (or --model with an LPIPS model exported with --spatial), or drop it.")
    if kind.head is None:
        return {}
    return {kind.weights_option: getattr(args, kind.weights_option, None),
            **({"spatial": spatial} if kind.spatial else {})}
