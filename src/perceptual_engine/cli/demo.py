"""``perceptual-engine demo``: export, verify, measure distortions of a real photo, time it.

1. Exports a distance model into the output folder (reused on later runs) and
   prints the parity errors measured against the PyTorch reference.
2. Distorts a bundled photograph (Gaussian blur, Gaussian noise, JPEG) at three
   increasing strengths, with a fixed seed, and prints the distances: they should
   grow with strength, and the demo says whether they do.
   Beside them, LPIPS (VGG16, the lpips package's v0.1 weights; printed as "LPIPS (VGG16)") of the same pairs,
   from an LPIPS model exported once into the output folder (``--no-lpips`` skips it),
   and DISTS (VGG16 with L2 pooling, DISTS_pytorch's alpha/beta) likewise (``--no-dists``).
3. Prints an ONNX Runtime vs PyTorch speed table from the benchmark package, with
   the OpenVINO rows (``openvino-bf16``, ``torch-bf16-autocast``) when the
   ``[openvino]`` extra is installed.

ImageNet weights need a download. When it is impossible the demo (and only the
demo) falls back to seeded random weights, announced by a banner on stderr.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
from importlib import resources
from typing import IO, Callable

import numpy as np

from .. import trunks as _trunks
from ..lpips import nets as lpips_nets
from ..datasets.cache import CachedModel, check_entry, ensure_model, model_key
from ..errors import WeightsError
from ..images import center_crop, decode, resize
from ..spec import FeatureSpec, LossConfig
from ..weights import load_weights

SAMPLE_PHOTOS = ("astronaut.jpg", "coffee.jpg")
SEED = 0
# (kind, parameter name, three increasing strengths)
DISTORTIONS = (
    ("gaussian blur", "radius", (1.0, 2.0, 4.0)),
    ("gaussian noise", "sigma", (0.02, 0.05, 0.1)),
    ("jpeg", "quality", (50, 20, 5)),
)


def default_loss(spec: FeatureSpec, gram: str = "chw") -> LossConfig:
    """The demo's loss: content on relu2_2 (else the deepest layer), style on every layer."""
    content = "relu2_2" if "relu2_2" in spec.layers else spec.deepest
    return LossConfig(content={content: 1.0}, style={n: 1.0 for n in spec.layers}, gram=gram)


def sample_photo(name: str = SAMPLE_PHOTOS[0]) -> str:
    """Path of a photograph shipped with the package (see data/README.md)."""
    return str(resources.files("perceptual_engine") / "data" / name)


def _to_pil(x: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.round(x.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")


def _from_pil(img) -> np.ndarray:
    return (np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1).copy()


def distort(x: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One distortion of a (3, H, W) image in [0, 1]."""
    from PIL import ImageFilter

    if kind == "gaussian blur":
        return _from_pil(_to_pil(x).filter(ImageFilter.GaussianBlur(radius=strength)))
    if kind == "gaussian noise":
        return np.clip(x + rng.normal(0.0, strength, size=x.shape), 0, 1).astype(np.float32)
    if kind == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        _to_pil(x).save(buf, format="JPEG", quality=int(strength))
        return _from_pil(Image.open(io.BytesIO(buf.getvalue())))
    raise ValueError(f"unknown distortion {kind!r}")


def prepare_photo(path: str, size: int) -> np.ndarray:
    """The photo center-cropped to a square, resized to size x size, on the 8-bit grid
    (so every distortion starts from exactly this image)."""
    x = decode(path)
    side = min(x.shape[1:])
    return _from_pil(_to_pil(resize(center_crop(x, (side, side)), (size, size))))


def banner(lines: list[str], err: IO[str]) -> None:
    rule = "!" * 78
    err.write("\n".join([rule, *[f"!! {line}" for line in lines], rule]) + "\n")
    err.flush()


def export_model(spec: FeatureSpec, loss: LossConfig, out_dir: str, dtype: str,
                 say: Callable[[str], None], err: IO[str]) -> tuple[FeatureSpec, CachedModel]:
    """The demo's model, with the announced random-weights fallback for ImageNet."""
    name = f"{spec.arch}-distance"
    path = os.path.join(out_dir, f"{name}.onnx")
    if spec.weights == "imagenet" and check_entry(path, model_key(spec, loss, dtype), spec, loss,
                                                  dtype)[0] is None:
        try:
            # Downloads once into torch's hub cache, where the export finds it; torch
            # reports the download on stdout, which is the demo's results stream.
            with contextlib.redirect_stdout(err):
                load_weights(spec)
        except WeightsError as exc:
            spec = _fallback(spec, exc, err)
    return spec, ensure_model(spec, loss, dtype=dtype, folder=out_dir, name=name, say=say)


def _fallback(spec: FeatureSpec, exc: WeightsError, err: IO[str]) -> FeatureSpec:
    banner([
        f"ImageNet {spec.arch} weights are NOT available, so this demo FALLS BACK TO",
        f"SEEDED RANDOM WEIGHTS (seed {spec.seed}). The numbers below come from a random",
        "network: they still grow with distortion, but they are not a trained",
        "perceptual distance. (Only the demo does this; export and distance refuse.)",
        f"why: {str(exc).split('. Accepted')[0]}",
        "fix: allow the download once, or put the torchvision checkpoint in the",
        "     torch hub cache, or pass --weights path/to/vgg19.pth (or .safetensors).",
    ], err)
    return dataclasses.replace(spec, weights="random")


def head_model(graph: str, spec: FeatureSpec, out_dir: str, dtype: str,
               say: Callable[[str], None], err: IO[str]) -> tuple[CachedModel | None, str]:
    """(the demo's LPIPS or DISTS model, its trunk weights) or (None, why it is skipped).

    The trunk follows the demo's weights: ImageNet VGG16 (seeded random when that
    cannot be had, as the banner says), random, or the given file if it is VGG16's.
    A missing lpips or DISTS_pytorch package skips the column; the rest of the demo stands.
    """
    from .. import kinds
    from ..errors import PerceptualError, first_line

    kind = kinds.get(graph)
    label, module = kind.label, kind.module()
    weights = spec.weights
    if weights not in ("imagenet", "random") and spec.arch != "vgg16":
        return None, f"skipped: --weights is a {spec.arch} file and {label} runs VGG16"
    hspec = module.default_spec(weights, seed=spec.seed)
    try:
        if weights == "imagenet":
            try:
                with contextlib.redirect_stdout(err):
                    load_weights(hspec)
            except WeightsError:
                hspec = dataclasses.replace(hspec, weights="random")
                err.write(f"  {label}: ImageNet VGG16 weights are not available either; its column "
                          f"uses SEEDED RANDOM trunk weights (seed {spec.seed})\n")
        entry = ensure_model(hspec, None, dtype=dtype, graph=graph, folder=out_dir,
                             name=f"vgg16-{graph}", say=say)
    except PerceptualError as exc:
        return None, f"skipped: {first_line(exc).split(': ', 1)[1]}"
    return entry, hspec.weights


def lpips_model(spec: FeatureSpec, out_dir: str, dtype: str, say: Callable[[str], None],
                err: IO[str]) -> tuple[CachedModel | None, str]:
    return head_model("lpips", spec, out_dir, dtype, say, err)


def dists_model(spec: FeatureSpec, out_dir: str, dtype: str, say: Callable[[str], None],
                err: IO[str]) -> tuple[CachedModel | None, str]:
    return head_model("dists", spec, out_dir, dtype, say, err)


def demo_variants() -> tuple[str, ...]:
    """The speed table's rows: PyTorch and ONNX Runtime, and with the [openvino] extra the
    OpenVINO row beside its PyTorch peer at the same precision (bf16 autocast)."""
    import importlib.util

    rows = ("torch-eager-fp32", "ort-cpu")
    if importlib.util.find_spec("openvino") is None:
        return rows
    from ..bench.variants import openvino_unavailable

    if openvino_unavailable("bf16", grad=False) is None:
        return rows + ("torch-bf16-autocast", "openvino-bf16")
    return rows + ("openvino-f32",)


def speed_table(out: IO[str], out_dir: str = "out") -> None:
    """A short ONNX Runtime vs PyTorch table from the benchmark package.

    One point (distance, 224², batch 1, 5 timed calls): enough to show the ratio in
    a few seconds; ``perceptual-engine bench`` is the real measurement. The bench's
    model is kept in ``out_dir`` so later demos skip its export.
    """
    from perceptual_engine.bench import BenchConfig, run
    from perceptual_engine.bench.report import to_markdown

    try:
        result = run(BenchConfig(workloads=("distance",), sizes=(224,), batch_sizes=(1,),
                                 variants=demo_variants(), quick=True,
                                 iters=5, warmup=1, input_sets=2, measure_peak=False,
                                 cache_dir=os.path.join(out_dir, "bench-models")))
    except Exception as exc:  # the demo's other results stand; say why the table is missing
        out.write(f"speed table unavailable: the benchmark failed ({type(exc).__name__}: {exc}).\n")
        return
    out.write(to_markdown(result).rstrip() + "\n")


def run_demo(spec: FeatureSpec, loss: LossConfig, *, out_dir: str = "out", photo: str | None = None,
             size: int = 224, device: str = "auto", dtype: str = "float32", bench: bool = True,
             lpips: bool = True, dists: bool = True, out: IO[str], err: IO[str],
             precision: str = "auto") -> int:
    """Run the demo, printing to ``out`` (results) and ``err`` (progress, warnings).

    Returns 0; a distance that does not grow with strength is reported as a warning.
    """
    from ..runtime import Engine

    def say(msg: str) -> None:
        err.write(f"  {msg}\n")
        err.flush()

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    # The weights are named after export_model: it may have fallen back to random ones.
    out.write(f"1. distance model: {spec.arch} up to {spec.deepest}\n")
    spec, entry = export_model(spec, loss, out_dir, dtype, say, err)
    state = f"exported in {entry.seconds:.1f} s" if entry.built else "reused (already exported)"
    out.write(f"   {entry.path} ({os.path.getsize(entry.path) / 1e6:.1f} MB, {state}), weights "
              f"{spec.weights}{' seed %d' % spec.seed if spec.weights == 'random' else ''}\n")
    out.write("   parity vs the PyTorch reference (ONNX Runtime CPU, measured at export):\n")
    for name, e in entry.errors.items():
        out.write(f"     {name:<18} max abs {e['max_abs']:.2e}   max rel {e['max_rel']:.2e}\n")

    photo = photo or sample_photo()
    ref = prepare_photo(photo, size)
    rng = np.random.default_rng(SEED)
    rows, ys = [], []
    for kind, param, strengths in DISTORTIONS:
        for s in strengths:
            rows.append((kind, f"{param} {s:g}"))
            ys.append(distort(ref, kind, s, rng))
    ys_arr = np.ascontiguousarray(np.stack(ys), dtype=np.float32)
    xs_arr = np.ascontiguousarray(np.broadcast_to(ref, ys_arr.shape), dtype=np.float32)
    lo, hi = (-1.0, 1.0) if spec.input_range == "-1,1" else (0.0, 1.0)
    xs_arr, ys_arr = lo + (hi - lo) * xs_arr, lo + (hi - lo) * ys_arr
    t0 = time.perf_counter()
    engine = Engine(entry.path, device, precision=precision)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dist = engine.distance(xs_arr, ys_arr)
    run_s = time.perf_counter() - t0

    lp_values, lp_note = None, "skipped (--no-lpips)"
    lp_label = lpips_nets.NETS[lpips_nets.DEFAULT].label  # "LPIPS (VGG16)"
    if lpips:
        lp_entry, lp_note = lpips_model(spec, out_dir, dtype, say, err)
        if lp_entry is not None:
            lp = Engine(lp_entry.path, device, precision=precision)
            y01 = np.ascontiguousarray(np.stack(ys), dtype=np.float32)
            x01 = np.ascontiguousarray(np.broadcast_to(ref, y01.shape), dtype=np.float32)
            a, b = (-1.0, 2.0) if lp.spec.input_range == "-1,1" else (0.0, 1.0)
            lp_values = lp.distance(a + b * x01, a + b * y01)["total"]
            net = lpips_nets.for_arch(lp.spec.arch)
            lp_label = net.label
            lp_note = (f"{_trunks.get(net.arch).label} trunk weights {lp_note}, lpips v0.1 linear weights "
                       f"({net.weights_file})")
    ds_values, ds_note = None, "skipped (--no-dists)"
    if dists:
        ds_entry, ds_note = dists_model(spec, out_dir, dtype, say, err)
        if ds_entry is not None:
            y01 = np.ascontiguousarray(np.stack(ys), dtype=np.float32)
            x01 = np.ascontiguousarray(np.broadcast_to(ref, y01.shape), dtype=np.float32)
            ds_values = Engine(ds_entry.path, device).distance(x01, y01)["total"]
            ds_note = f"VGG16 trunk weights {ds_note}, DISTS_pytorch alpha/beta"
    content = [n for n in engine.output_names if n.startswith("content.")]
    style = [n for n in engine.output_names if n.startswith("style.")]
    out.write(f"\n2. distances from {os.path.basename(photo)} ({size}x{size}) to distorted copies "
              f"(seed {SEED}), on {engine.providers[0]}: {len(rows)} pairs in {run_s:.2f} s "
              f"(session {load_s:.2f} s)\n")
    head = f"   {'distortion':<16}{'strength':<14}{'content':>12}{'style':>12}{'total':>12}{'DISTS':>10}{'LPIPS':>10}"
    out.write(head + "\n   " + "-" * (len(head) - 3) + "\n")
    c_w, s_w = loss.content, loss.style
    for i, (kind, label) in enumerate(rows):
        c = sum(c_w[n.split(".", 1)[1]] * float(dist[n][i]) for n in content)
        s = sum(s_w[n.split(".", 1)[1]] * float(dist[n][i]) for n in style)
        lp_cell = f"{float(lp_values[i]):>10.4f}" if lp_values is not None else f"{'-':>10}"
        ds_cell = f"{float(ds_values[i]):>10.4f}" if ds_values is not None else f"{'-':>10}"
        out.write(f"   {kind:<16}{label:<14}{c:>12.4g}{s:>12.4g}{float(dist['total'][i]):>12.4g}"
                  f"{ds_cell}{lp_cell}\n")
    bad = []
    for j, (kind, _, strengths) in enumerate(DISTORTIONS):
        totals = [float(dist["total"][j * len(strengths) + k]) for k in range(len(strengths))]
        if not all(a < b for a, b in zip(totals, totals[1:])):
            bad.append(f"{kind} ({', '.join(f'{t:.4g}' for t in totals)})")
    if bad:
        out.write(f"   WARNING: the distance does not grow with strength for: {'; '.join(bad)}\n")
    else:
        out.write("   the distance grows with strength for every distortion, as it should.\n")
    out.write(f"   (content and style are the weighted sums of the {len(content)} content and "
              f"{len(style)} style terms; the model outputs each term separately)\n")
    out.write(f"   (DISTS: {ds_note})\n")
    out.write(f"   ({lp_label}: {lp_note})\n")

    out.write("\n3. speed: ONNX Runtime vs PyTorch (perceptual_engine.bench, quick)\n")
    if bench:
        t0 = time.perf_counter()
        speed_table(out, out_dir)
        out.write(f"   (benchmark took {time.perf_counter() - t0:.1f} s)\n")
    else:
        out.write("   skipped (--no-bench)\n")
    out.write(f"\ndemo done in {time.perf_counter() - start:.1f} s; model in {out_dir}\n")
    out.flush()
    return 0
