"""``perceptual-engine stylize CONTENT STYLE -o OUT.png``: the image-optimization loop.

Parses the options, calls ``perceptual_engine.stylize`` and reports: a progress bar
with the current loss on a terminal (plain lines otherwise), the initial and final
loss, the time per step. The image is written atomically; with ``--save-every K``
it is also written every K steps, so Ctrl-C (exit 130) leaves the last one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import IO

from ..errors import ConfigError, ImageError
from .options import SPEC_FLAGS, add_device_options, add_spec_options, positive_int, spec_from_args

DESCRIPTION = """\
Optimize an image so that its VGG features match CONTENT's (content terms) and its
Gram matrices match STYLE's (style terms), after Gatys et al. (2016). Each step
runs the exported target graph with its gradient on the Engine (exported once into
the model cache), then updates the pixels (Adam or L-BFGS) and clamps them to the
input range.

Defaults: VGG19; content relu4_2 (weight 1); style relu1_1, relu2_1, relu3_1,
relu4_1, relu5_1 (weight 100 each); --gram hw; --pooling avg (as Gatys et al.
synthesize images; --pooling max is the network as trained); start from the content
image; the style image is resized to the content image's size. --weights defaults
to imagenet (downloaded by torchvision); with --weights random the result stays
close to the content image, slightly recolored (see docs/stylize.md).

Exit status: 0 done; 1 an error while running (e.g. weights not available);
2 usage errors (missing or unreadable images, sizes below the deepest layer's
minimum, bad options); 130 interrupted (the last --save-every image is kept).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..optimize import DEFAULT_LR, INITS, OPTIMIZERS
    from ..runtime import DEVICES

    # dests apart from --content/--style (the loss's weights)
    p.add_argument("content_image", metavar="CONTENT", help="content image file")
    p.add_argument("style_image", metavar="STYLE", help="style image file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png",
                   help="image to write (atomically); format from the extension")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=positive_int, default=300, metavar="N",
                   help="optimizer steps (default: 300)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="default: adam")
    g.add_argument("--lr", type=_positive_float, metavar="LR",
                   help=f"learning rate (default: adam {DEFAULT_LR['adam']:g} per unit of the "
                        f"input range, lbfgs {DEFAULT_LR['lbfgs']:g})")
    g.add_argument("--init", choices=INITS, default="content",
                   help="start from the content image or from seeded noise (default: content)")
    g.add_argument("--stop-below", type=float, metavar="LOSS",
                   help="stop as soon as the total loss is at or below LOSS")
    g.add_argument("--size", type=positive_int, metavar="PIXELS",
                   help="longest side of the result (default: the content image's)")
    g.add_argument("--style-size", type=positive_int, metavar="PIXELS",
                   help="longest side of the style image (default: resized to the result's size)")
    g.add_argument("--save-every", type=positive_int, metavar="K",
                   help="also write OUT every K steps (Ctrl-C then keeps the last one)")
    add_device_options(g, DEVICES)
    g.add_argument("--model", metavar="ONNX", help="an exported target model with gradient "
                   "(export --graph target --grad); without it one is exported from the spec "
                   "flags into the cache once")
    g.add_argument("--cache-dir", metavar="DIR", help="model cache (default: as for distance)")
    add_spec_options(p, default_layers="relu1_1,relu2_1,relu3_1,relu4_1,relu4_2,relu5_1")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number > 0")
    return value


def _check_output(path: str) -> None:
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    if ext not in Image.registered_extensions():
        raise ConfigError(f"-o {path!r} has no image extension Pillow writes; accepted: .png, "
                          ".jpg, .bmp, .tif, .webp, ... e.g. -o out.png.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"-o {path!r}: the folder {folder!r} does not exist; create it first.")


def _spec_and_loss(args: argparse.Namespace):
    from ..optimize import GATYS_LAYERS, default_loss

    given = [f for f in SPEC_FLAGS if getattr(args, f) is not None]
    if args.model:
        if given:
            raise ConfigError(f"--model reads the spec from the model; drop "
                              f"{', '.join('--' + f.replace('_', '-') for f in given)}.")
        return None, None
    if args.layers is None and args.content is None and args.style is None:
        args.layers = GATYS_LAYERS  # Gatys' layers, not export's usual four
    args.gram = args.gram or "hw"
    args.pooling = args.pooling or "avg"  # Gatys' choice for synthesis
    return spec_from_args(args, default_loss=default_loss)


class _Report:
    """Progress on ``stream``: a redrawn bar on a terminal, else a line per tenth."""

    def __init__(self, steps: int, stream: IO[str], tty: bool) -> None:
        self.steps, self.stream, self.tty = steps, stream, tty
        self.first = 0.0  # when step 1 ended: the rate is measured from there (no export)
        self.done = 0
        self.every = max(1, steps // 10)

    def __call__(self, done: int, steps: int, loss: float) -> None:
        now = time.perf_counter()
        if self.done == 0:
            self.first = now
        self.done = done
        text = f"step {done}/{steps} loss {loss:.4g}"
        if done > 1:
            per = (now - self.first) / (done - 1)
            eta = per * (steps - done)
            text += f" {per:.2f} s/step ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        if self.tty:
            frac = done / steps
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            self.stream.write(f"\r\033[K[{bar}] {text}")
        elif done % self.every == 0 or done == steps:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\r\033[K")
            self.stream.flush()


def main(args: argparse.Namespace, say) -> int:
    from ..optimize import stylize

    spec, loss = _spec_and_loss(args)
    _check_output(args.output)
    report = _Report(args.steps, sys.stderr, sys.stderr.isatty())
    kept: list[int] = []  # the step of the image OUT holds (from --save-every)
    try:
        result = stylize(args.content_image, args.style_image, spec=spec, loss=loss, model=args.model,
                         steps=args.steps, optimizer=args.optimizer, lr=args.lr,
                         init=args.init, stop_below=args.stop_below, size=args.size,
                         style_size=args.style_size, device=args.device, precision=args.precision,
                         dtype=args.dtype or "float32", save_every=args.save_every,
                         save_path=args.output if args.save_every else None,
                         progress=report, on_save=lambda step, _: kept.append(step),
                         cache_dir=args.cache_dir, say=say)
    except ImageError as exc:  # CONTENT or STYLE unreadable: the arguments' fault
        raise ConfigError(str(exc)) from exc
    except KeyboardInterrupt:
        report.close()
        done = max([report.done, *kept])
        if kept:
            say(f"interrupted after step {done}; {args.output} holds the image of step {kept[-1]}")
        else:
            say(f"interrupted after step {done}; no image was saved yet"
                + ("" if args.save_every else " (--save-every K keeps one every K steps)"))
        return 130
    report.close()
    from ..images import save_image

    save_image(args.output, result.image[0], input_range=result.input_range)
    n = result.steps_done
    print(f"initial loss {result.initial_loss:.6g}, final loss {result.final_loss:.6g} after "
          f"{n} step(s) ({result.stopped.replace('_', ' ')}); {result.seconds_per_step:.3f} s "
          f"per step (median), {result.evaluations} evaluations")
    terms = ", ".join(f"{k} {v:.4g}" for k, v in result.terms.items() if k != "total")
    print(f"final terms (unweighted): {terms}")
    print(f"wrote {args.output} ({result.image.shape[2]}x{result.image.shape[3]}) on "
          f"{result.providers[0] if result.providers else args.device}; model {result.model_path}")
    return 0

