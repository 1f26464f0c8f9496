"""The memory estimate: an upper bound of one call's peak memory from the layer table
alone (channels and downsampling per layer): arithmetic, no allocation, a few
microseconds. The constants were measured on ONNX Runtime's CPU provider
(docs/memory.md); ``suggest_side`` inverts the bound for a budget."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .. import kinds, layers as _layers
from ..errors import ConfigError

# Images through the network per sample, by graph kind (kinds.py): a pair graph runs
# x and y as one batch of 2N.
IMAGES_PER_SAMPLE: dict[str, int] = {k.name: k.images for k in kinds.KINDS.values()}

# Calibration (docs/memory.md). WORK: live activation tensors while a convolution
# runs (its input and output). TAP: copies held per tapped layer, fitted per graph
# kind (a features graph returns every tap, so all stay alive; a distance graph's
# loss consumes them sooner). GRAM: copies made per image to compute a style layer's
# Gram (the feature scaled, flattened and transposed), alive while it is computed.
# GRAD_WORK: the backward's tensors per differentiated image (x only, never y), as a
# multiple of every activation of the network, on top of the saved activations.
# GRAM and GRAD_WORK were fitted on shallow models at 256² and 512² (docs/memory.md);
# ARENA on a GPU is not measured yet: a conservative guess.
WORK = 2.0
TAP = {k.name: k.tap_factor for k in kinds.KINDS.values()}
GRAM = 1.5
GRAD_WORK = 2.0
FIXED = 16 << 20  # per call, whatever the size: small buffers, the outputs, allocator slack
MARGIN = 1.10  # the bound is the model times this
ARENA = 1.25  # ONNX Runtime's memory arena (CPU arena on, or any GPU) rounds and keeps blocks


@dataclass(frozen=True)
class MemoryEstimate:
    """An upper bound of one call's peak memory, in bytes, and how it was reached.

    ``images``: images through the network (N, or 2N for a pair graph);
    ``peak_layer``: where the forward's working set peaks; ``total``: the bound.
    """

    total: int
    images: int
    height: int
    width: int
    graph: str
    dtype: str
    grad: bool
    deepest: str
    peak_layer: str
    grams: tuple[str, ...] = ()

    def describe(self) -> str:
        what = f"{self.images} image(s) of {self.height}x{self.width} through {self.deepest}"
        return (f"about {format_bytes(self.total)} ({what}, {self.graph} graph, {self.dtype}"
                f"{', with gradient' if self.grad else ''})")


def itemsize(dtype: str, device: str = "cpu") -> int:
    """Bytes per activation element. On ONNX Runtime's CPU provider a float16 model
    was measured to take as much memory as a float32 one (docs/memory.md), so it is
    costed at 4 bytes there; on a GPU float16 halves the activations."""
    if dtype == "float16" and device != "cpu":
        return 2
    if dtype in ("float32", "float16"):
        return 4
    raise ConfigError(f"dtype {dtype!r} is not accepted; accepted: 'float32', 'float16'.")


@lru_cache(maxsize=4096)  # a call's check is then a dictionary lookup
def estimate(spec, graph: str, n: int, height: int, width: int, *, dtype: str = "float32",
             grad: bool = False, taps: tuple[str, ...] | None = None,
             device: str = "cpu", arena: bool = False, workspace: int = 0,
             sessions: int = 1, grams: tuple[str, ...] = ()) -> MemoryEstimate:
    """Upper bound of the peak memory of one call, in bytes.

    spec: the FeatureSpec (arch, layers: the network is cut after the deepest).
    graph: the graph kind ("features", "distance", "style", "target", "lpips", ...).
    n, height, width: the batch and the input size in pixels.
    taps: the layers whose outputs the graph keeps (default: ``spec.layers``).
    grams: the style layers, whose Gram matrices the graph computes (the loss's
        ``style``; none for features and LPIPS graphs).
    grad: the graph also computes a gradient of x (every activation is kept for the
        backward).
    device: "cpu" or a GPU ("cuda"); arena: ONNX Runtime allocates from its memory
        arena (the CPU arena when on, always on a GPU).
    workspace: GPU only, bytes cuDNN's convolution workspace may take (an arena
        block that is kept); sessions: GPU only, sessions holding activations (2
        with a CUDA graph: the captured session has its own arena).

    With B images through the network (N, or 2N for pair graphs), s bytes per
    element (``itemsize``), e_l = C_l·⌊H/d_l⌋·⌊W/d_l⌋ the elements of layer l per
    image (channels C_l and downsampling d_l from the layer table), [l ∈ grams] 1 at
    a style layer and 0 elsewhere:

        forward = s·B·max_l (WORK·e_l + Σ_{tap t ≤ l} TAP[graph]·e_t + GRAM·[l ∈ grams]·e_l)
        grad    = s·(B·Σ_l e_l + N·(GRAD_WORK·Σ_l e_l + GRAM·Σ_{g ∈ grams} e_g))
                  (replaces forward; only x, N images, is differentiated)
        inputs  = 4·B·3·H·W·2      (the caller's arrays and the normalized copy)
        total   = MARGIN·A·(S·(forward or grad) + inputs) + W + FIXED
                  with A = ARENA when an arena allocates (``arena``, or a GPU), else 1,
                  S = sessions and W = workspace (both on a GPU only; 1 and 0 on CPU)

    l runs over the conv, ReLU and pool layers up to the deepest. The constants
    are measured (docs/memory.md): the bound is above the measured peak RSS of ONNX
    Runtime CPU calls of every graph kind, with and without a gradient.
    """
    images = n * IMAGES_PER_SAMPLE.get(graph, 2)
    styled = set(grams)
    size = itemsize(dtype, device)
    tapped = set(spec.layers if taps is None else taps)
    tap_factor = TAP.get(graph, max(TAP.values()))
    layers = _layers.table(spec.arch)[: _layers.deepest(spec.arch, spec.layers).index + 1]
    held = 0.0  # tap copies accumulated so far, elements per image
    total_act, gram_act, worst, worst_at = 0, 0, 0.0, layers[0].name
    for info in layers:
        e = info.channels * info.size(height) * info.size(width)
        if info.name in tapped:
            held += tap_factor * e
        live = WORK * e + held
        if info.name in styled:  # its Gram is computed while the tap is held
            live += GRAM * e
            gram_act += e
        if live > worst:
            worst, worst_at = live, info.name
        total_act += e
    if grad:
        body = size * (images * total_act + n * (GRAD_WORK * total_act + GRAM * gram_act))
    else:
        body = size * images * worst
    inputs = 4 * images * 3 * height * width * 2
    pool = ARENA if (arena or device != "cpu") else 1.0
    if device == "cpu":
        workspace, sessions = 0, 1
    total = int(MARGIN * pool * (sessions * body + inputs)) + int(workspace) + FIXED
    return MemoryEstimate(total, images, height, width, graph, dtype, grad,
                          layers[-1].name, worst_at, tuple(grams))


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as --memory-budget reads them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def suggest_side(height: int, width: int, estimate: int, budget: int) -> int | None:
    """A longer side (a multiple of 32) at which a call estimated at ``estimate`` for
    height x width would fit ``budget``; None if none would. The estimate grows with
    the pixel count, so the side scales with the square root of the ratio."""
    if estimate <= FIXED or budget <= FIXED:
        return None
    side = int(max(height, width) * ((budget - FIXED) / (estimate - FIXED)) ** 0.5) // 32 * 32
    return side if side >= 32 else None
