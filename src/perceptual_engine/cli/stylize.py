"""``perceptual-engine stylize CONTENT STYLE -o OUT.png``: the image-optimization loop.

Parses the options, calls ``perceptual_engine.stylize`` and reports: a progress bar
with the current loss on a terminal (plain lines otherwise), the initial and final
loss, the time per step. The image is written atomically; with ``--save-every K``
it is also written every K steps, so Ctrl-C (exit 130) leaves the last one.
"""
from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import time
from typing import IO

from ..errors import ConfigError, ImageError, OptimizationError, PerceptualError
from .options import SPEC_FLAGS, add_device_options, add_spec_options, positive_int, spec_from_args

def _description() -> str:
    from ..optimize import (CONTENT_LAYER, DEFAULT_GRAM, DEFAULT_POOLING, DEFAULT_STYLE_WEIGHT,
                            STYLE_LAYERS)

    return f"""\
Optimize an image so that its VGG features match CONTENT's (content terms) and its
Gram matrices match STYLE's (style terms), after Gatys et al. (2016). Each step
runs the exported target graph with its gradient on the Engine (exported once into
the model cache), then updates the pixels (Adam or L-BFGS) and clamps them to the
input range.

Defaults: VGG19; content {CONTENT_LAYER} (weight 1);
style {', '.join(STYLE_LAYERS)} (weight {DEFAULT_STYLE_WEIGHT:g} each);
--gram {DEFAULT_GRAM}; --pooling {DEFAULT_POOLING} (as Gatys et al. synthesize images; --pooling max is
the network as trained); start from the content image; the style image is resized
to the content image's size. --weights defaults
to imagenet (downloaded by torchvision); with --weights random the result stays
close to the content image, slightly recolored (see docs/stylize.md).

-o may hold {{step}} (e.g. out-{{step:04d}}.png): each --save-every image and the
final one are then written under their own step number; write a literal brace as
{{{{ or }}}}. -o may not be CONTENT or STYLE (by any path) without --overwrite-input.

Exit status: 0 done; 1 an error while running (e.g. weights not available, or a loss
that overflows float32 or cannot move the image: the message names the flag to
change); 2 usage errors (missing or unreadable images, sizes below the deepest
layer's minimum, bad options, an -o that cannot be written); 130 interrupted
(SIGINT), 143 terminated (SIGTERM): the last --save-every image is kept, no
temporary file is left.
"""


DESCRIPTION = _description()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..optimize import (CONTENT_LAYER, DEFAULT_GRAM, DEFAULT_LR, DEFAULT_POOLING,
                            DEFAULT_STYLE_WEIGHT, GATYS_LAYERS, INITS, OPTIMIZERS, STYLE_LAYERS)
    from ..runtime import DEVICES

    # dests apart from --content/--style (the loss's weights)
    p.add_argument("content_image", metavar="CONTENT", help="content image file")
    p.add_argument("style_image", metavar="STYLE", help="style image file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png",
                   help="image to write (atomically); format from the extension; {step} in the "
                        "file name is replaced by the step number, {{ }} are literal braces")
    p.add_argument("--overwrite-input", action="store_true",
                   help="allow -o to be CONTENT or STYLE (refused otherwise: exit 2)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=positive_int, default=300, metavar="N",
                   help="optimizer steps (default: 300)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="default: adam")
    g.add_argument("--lr", type=_positive_float, metavar="LR",
                   help=f"learning rate (default: adam {DEFAULT_LR['adam']:g} per unit of the "
                        f"input range, lbfgs {DEFAULT_LR['lbfgs']:g})")
    g.add_argument("--init", choices=INITS, default="content",
                   help="start from the content image or from seeded noise (default: content)")
    g.add_argument("--stop-below", type=_finite_float, metavar="LOSS",
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
    # Help from the constants _spec_and_loss applies, so --help shows what runs.
    style = ",".join(f"{n}={DEFAULT_STYLE_WEIGHT:g}" for n in STYLE_LAYERS)
    add_spec_options(p, default_layers=",".join(GATYS_LAYERS), default_pooling=DEFAULT_POOLING,
                     default_gram=DEFAULT_GRAM,
                     default_content=f"{CONTENT_LAYER}=1 when --style is not given either",
                     default_style=f"{style} when --content is not given either")


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a finite number > 0")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _check_output(args: argparse.Namespace) -> None:
    """Every file -o may name, before the model is exported or step 1 runs."""
    from ..optimize.savepaths import check_save_path

    final = range(args.steps + 1)  # the last image carries the steps done (--stop-below: fewer)
    check_save_path(args.output, steps=final, inputs=(args.content_image, args.style_image),
                    overwrite_input=args.overwrite_input, what="-o",
                    overwrite_flag="--overwrite-input")


def _spec_and_loss(args: argparse.Namespace):
    from ..optimize import DEFAULT_GRAM, DEFAULT_POOLING, GATYS_LAYERS, check_model, default_loss

    given = [f for f in SPEC_FLAGS if getattr(args, f) is not None]
    if args.model:
        if given:
            raise ConfigError(f"--model reads the spec from the model; drop "
                              f"{', '.join('--' + f.replace('_', '-') for f in given)}.")
        check_model(args.model, command=True)
        return None, None
    if args.layers is None and args.content is None and args.style is None:
        args.layers = GATYS_LAYERS  # Gatys' layers, not export's usual four
    args.gram = args.gram or DEFAULT_GRAM
    args.pooling = args.pooling or DEFAULT_POOLING
    return spec_from_args(args, default_loss=default_loss)


# Library messages name API arguments as name=...; this command names its flags.
_LITERAL = (("overwrite_input=True", "--overwrite-input"), ("init='noise'", "--init noise"))
_FLAGS = {"style_size": "--style-size", "stop_below": "--stop-below", "save_every": "--save-every",
          "save_path": "-o", "size": "--size", "steps": "--steps", "lr": "--lr", "model": "--model",
          "init": "--init", "optimizer": "--optimizer"}
_ARG = re.compile(r"\b(" + "|".join(_FLAGS) + r")=(\S?)")
_FLAG_NAMES = {"lr": "--lr", "weights": "the --content/--style weights", "init": "--init noise"}


def _in_flags(exc: PerceptualError) -> PerceptualError:
    """``exc`` with its message in this command's terms (the same object, re-raised)."""
    if isinstance(exc, OptimizationError):
        text = exc.wording(**_FLAG_NAMES)
    else:
        text = str(exc)
        for api, flag in _LITERAL:
            text = text.replace(api, flag)
        text = _ARG.sub(lambda m: _FLAGS[m.group(1)] + (f" {m.group(2)}" if m.group(2) else ""), text)
    exc.args = (text,)
    return exc


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


class _Signals:
    """SIGINT and SIGTERM while stylize runs.

    Inside the optimization loop (from its first poll of ``stop`` until ``stylize``
    returns) a signal only sets a flag, and the loop stops between two steps: a
    KeyboardInterrupt raised by a handler lands in whatever Python code runs, and a
    step runs Python code called from native frames (autograd's engine calls the
    loss's backward; torch and ONNX Runtime call back into Python), where an
    exception that cannot unwind ends the process with std::terminate (status -6).
    A second signal inside the loop raises at once (a step can be long). Outside the
    loop (export, model load, writing OUT) a signal raises KeyboardInterrupt at once,
    like Python's own SIGINT, so the atomic writes there remove their temporary
    files; SIGTERM then ends with status 143 instead of leaving them behind.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.looping = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                if signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # ignored by whoever started us (nohup, a background job): keep so
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: object) -> None:
        again = self.received is not None
        self.received = self.received or signum
        if not self.looping or again:
            raise KeyboardInterrupt

    def poll(self) -> bool:
        """``stop`` for the loop: polled before each step."""
        self.looping = True
        return self.received is not None

    @property
    def status(self) -> int:
        return 128 + signal.SIGTERM if self.received == signal.SIGTERM else 130


def main(args: argparse.Namespace, say) -> int:
    from ..images import save_image
    from ..optimize import stylize
    from ..optimize.savepaths import expand

    spec, loss = _spec_and_loss(args)
    _check_output(args)
    report = _Report(args.steps, sys.stderr, sys.stderr.isatty())
    kept: list[int] = []  # the step of the image OUT holds (from --save-every)
    with _Signals() as signals:
        try:
            try:
                result = stylize(
                    args.content_image, args.style_image, spec=spec, loss=loss, model=args.model,
                    steps=args.steps, optimizer=args.optimizer, lr=args.lr, init=args.init,
                    stop_below=args.stop_below, size=args.size, style_size=args.style_size,
                    device=args.device, precision=args.precision, dtype=args.dtype or "float32",
                    save_every=args.save_every, save_path=args.output if args.save_every else None,
                    progress=report, on_save=lambda step, _: kept.append(step),
                    cache_dir=args.cache_dir, say=say, overwrite_input=args.overwrite_input,
                    stop=signals.poll)
            finally:
                signals.looping = False
            if signals.received is not None:
                raise KeyboardInterrupt
            report.close()
            out = expand(args.output, result.steps_done)
            save_image(out, result.image[0], input_range=result.input_range)
        except ImageError as exc:  # CONTENT or STYLE unreadable: the arguments' fault
            raise ConfigError(str(exc)) from exc
        except PerceptualError as exc:
            raise _in_flags(exc) from None
        except KeyboardInterrupt:
            report.close()
            done = max([report.done, *kept])
            what = "terminated (SIGTERM)" if signals.received == signal.SIGTERM else "interrupted"
            if kept:
                last = expand(args.output, kept[-1])
                say(f"{what} after step {done}; {last} holds the image of step {kept[-1]}")
            else:
                say(f"{what} after step {done}; no image was saved yet"
                    + ("" if args.save_every else " (--save-every K keeps one every K steps)"))
            return signals.status
    n = result.steps_done
    print(f"initial loss {result.initial_loss:.6g}, final loss {result.final_loss:.6g} after "
          f"{n} step(s) ({result.stopped.replace('_', ' ')}); {result.seconds_per_step:.3f} s "
          f"per step (median), {result.evaluations} evaluations")
    terms = ", ".join(f"{k} {v:.4g}" for k, v in result.terms.items() if k != "total")
    print(f"final terms (unweighted): {terms}")
    print(f"wrote {out} ({result.image.shape[2]}x{result.image.shape[3]}) on "
          f"{result.providers[0] if result.providers else args.device}; model {result.model_path}")
    return 0
