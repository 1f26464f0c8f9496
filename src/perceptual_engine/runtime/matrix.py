"""All-pairs distance matrices at the cost of one forward pass per image (docs/matrix.md).

Every term of an lpips or distance model is a squared L2 distance between per-image
embeddings (runtime/embed.py), so an N×M matrix is N + M forward passes and, per
term, one GEMM:  d(i, j) = |a_i|² + |b_j|² − 2⟨a_i, b_j⟩.

Precision: the GEMM runs in float32 (torch.matmul: MKL/oneDNN sgemm on the CPU,
cuBLAS on a CUDA engine's GPU, TF32 left at torch's default, off) on blocks centred
on their mean row (distances are unchanged; the norms that cancel shrink); norms,
the sum above and the weighted total are float64. Where two embeddings are close the
sum still cancels catastrophically: every entry with d < NEAR · (|a_i − μ|² + |b_j − μ|²)
is recomputed as Σ (a_i − b_j)² from the stored float32 values' difference (exact
for near-equal values), accumulated in float64. The diagonal of an x-against-itself matrix is 0
and the matrix is symmetric, both exactly.

Memory: embeddings stay in memory or, when they do not fit the engine's memory
budget, spill to memory-mapped files (runtime/embstore.py); the GEMM runs in square
blocks sized to the budget. Results are float32.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .. import kinds, memory as _memory
from ..errors import ConfigError, DeviceError, InputError, MemoryBudgetError, ModelError
from ..validate import check_tensor
from .embed import embed_taps, tap_tensors, term_dims, x_branch
from .embstore import EmbeddingStore

NEAR = 0.02  # relative threshold below which an entry is recomputed from the difference
MAX_BLOCK = 256  # rows per GEMM block: larger costs memory (two centred copies) and gains little
DEFAULT_BATCH = 16  # images per forward call, lowered to fit the budget

_EMBEDDERS: "weakref.WeakKeyDictionary[Any, Embedder]" = weakref.WeakKeyDictionary()


class Embedder:
    """The x branch of an engine's own model file, and the embedding formulas of its terms."""

    def __init__(self, engine: Any) -> None:
        import onnxruntime as ort

        info, path = engine.info, engine.path
        kind = kinds.get(info.graph)
        if not kind.matrix:
            raise ModelError(f"{path!r} is a {info.graph} graph; distance matrices need a model exported "
                             f"with {kinds.quoted(kinds.names(matrix=True))}.")
        model = _checked_model(path)
        self.lin: dict[str, np.ndarray] = {}
        self.gram = "chw"
        self.head_embed = None
        if kind.head is not None:  # a learned head's terms, from its module (lpips/matrix.py)
            self.terms, self.weights, self.lin, self.head_embed = kind.module().matrix_terms(info, model, path)
        else:
            loss = info.loss
            self.terms = {**{f"content.{n}": ("content", n) for n in loss.content},
                          **{f"style.{n}": ("style", n) for n in loss.style}}
            self.weights = {**{f"content.{n}": float(w) for n, w in loss.content.items()},
                            **{f"style.{n}": float(w) for n, w in loss.style.items()}}
            self.gram = loss.gram
        self.spec, self.dtype = info.spec, info.dtype
        self.taps = tuple(dict.fromkeys(layer for _, layer in self.terms.values()))
        names, concat = tap_tensors(model.graph, info.spec.arch, self.taps, path)
        branch = x_branch(model, names, concat)
        self._layers, self._outputs = list(names), list(names.values())
        if getattr(engine, "device", None) == "openvino":
            self.session = _OpenVinoBranch(branch)
            return
        # The x branch runs where the engine's own ONNX Runtime session runs, with its options.
        session = getattr(engine, "session", None)
        if not hasattr(session, "get_providers"):
            raise DeviceError(f"distance matrices run the model's x branch on ONNX Runtime or OpenVINO; "
                              f"{engine!r} has neither. Open the model with device='cpu', 'cuda' or "
                              "'openvino'.")
        providers = session.get_providers()
        opts = session.get_provider_options()
        self.session = ort.InferenceSession(branch.SerializeToString(),
                                            getattr(engine, "_session_opts", None) or ort.SessionOptions(),
                                            providers=providers,
                                            provider_options=[opts.get(p, {}) for p in providers])

    @classmethod
    def of(cls, engine: Any) -> "Embedder":
        """The engine's embedder, built once (the x branch is cut on first use)."""
        emb = _EMBEDDERS.get(engine)
        if emb is None:
            emb = _EMBEDDERS[engine] = cls(engine)
        return emb

    def dims(self, height: int, width: int) -> dict[str, int]:
        return term_dims(self.terms, self.spec.arch, height, width)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """{term: (n, D_t) float32} for images x (n, 3, H, W) float32."""
        outs = self.session.run(self._outputs, {"x": np.ascontiguousarray(x, dtype=np.float32)})
        return embed_taps(dict(zip(self._layers, outs)), self.terms, self.lin, self.gram, self.head_embed)


class _OpenVinoBranch:
    """The x branch compiled by OpenVINO for the CPU, always in f32: bf16's rounding follows
    the features, so in embeddings it is as large as a near-duplicate's distance, which no
    recompute from stored embeddings can undo (docs/matrix.md). ``run`` as ONNX Runtime's."""

    def __init__(self, branch: Any) -> None:
        import os
        import tempfile

        from .backends.openvino import import_openvino

        ov = import_openvino()
        core = ov.Core()
        fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix="pe-branch-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(branch.SerializeToString())
            model = core.read_model(tmp)
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        finally:
            os.unlink(tmp)
        self._ports = {n: p for p in self.compiled.outputs for n in p.get_names()}
        self._local = threading.local()

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        res = req.infer(feeds)
        return [np.array(res[self._ports[n]], dtype=np.float32, copy=True) for n in names]


def _checked_model(path: str) -> Any:
    """The ModelProto at ``path``, its integrity digests checked on these very bytes."""
    import onnx

    from ..export.integrity import check

    with open(path, "rb") as fh:
        model = onnx.load_model_from_string(fh.read())
    props = {p.key: p.value for p in model.metadata_props}
    check(model, props, path)
    return model


# -- memory -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How a matrix is computed: images per forward call, rows per GEMM block, and
    whether the embeddings spill to disk. ``limit``: the budget in bytes (None: none)."""

    batch: int
    block: int
    spill: bool
    limit: int | None
    embeddings: int  # bytes of all embeddings
    outputs: int  # bytes of the result matrices
    smallest: int  # bytes needed at the least: results, one image's forward, a one-row block


def plan(engine: Any, emb: Embedder, n: int, m: int, height: int, width: int, *,
         batch_size: int = DEFAULT_BATCH, block: int | None = None, store_dtype: str = "float32",
         spill: bool | None = None, outputs: bool = True) -> Plan:
    """Fit the forward batch, the GEMM block and the embeddings into the engine's budget.

    n, m: images of x and y (m = 0 for x against itself). outputs: the full matrices
    are kept (False: only blocks pass through, as for nearest neighbours).
    Raises MemoryBudgetError, with the figures, when not even one image and a block
    of one row fit.
    """
    limit = engine.memory_limit()
    dims = emb.dims(height, width)
    per_image = sum(dims.values()) * 4
    largest = max(dims.values()) * 4
    store = EmbeddingStore.nbytes_for(n + m, dims, store_dtype)
    out = n * (m or n) * 4 * (len(dims) + 1) if outputs else 0

    def forward(b: int) -> int:  # the x branch, its taps and the new embeddings
        est = _memory.estimate(emb.spec, "features", b, height, width, dtype=emb.dtype,
                               taps=emb.taps, device="cuda" if engine.on_gpu else "cpu",
                               arena=engine.cpu_arena)
        return est.total + 2 * b * per_image

    def gemm(b: int, spilled: bool) -> int:
        # rows read in (spilled), both blocks centred (the largest term), distances
        return (2 * b * per_image if spilled else 0) + 2 * b * largest + b * b * 8 * (len(dims) + 3)

    smallest = out + max(forward(1), gemm(1, True))
    if limit is None:
        return Plan(batch_size, block or MAX_BLOCK, bool(spill), None, store, out, smallest)
    if smallest > limit:
        fmt = _memory.format_bytes
        raise MemoryBudgetError(
            f"a {n}x{m or n} distance matrix of {height}x{width} images needs at least {fmt(smallest)} "
            f"(result matrices {fmt(out)}, one image through the network {fmt(forward(1))}, "
            f"embeddings of {fmt(per_image)} per image), over the memory budget of {fmt(limit)}. "
            "Raise the budget (memory_budget=, --memory-budget), use smaller images, or fewer "
            "images per matrix.", estimate=smallest, budget=limit)
    if spill is None:
        spill = out + store + max(forward(1), gemm(min(64, n), False)) > limit
    room = limit - out - (0 if spill else store)
    batch = max((b for b in range(1, batch_size + 1) if forward(b) <= room), default=1)
    size = max((b for b in (block or MAX_BLOCK, 256, 128, 64, 32, 16, 8, 4, 2, 1)
                if b <= (block or MAX_BLOCK) and gemm(b, spill) <= room), default=1)
    return Plan(batch, size, spill, limit, store, out, smallest)


# -- embeddings and blocks ----------------------------------------------------------------------
def embed_array(emb: Embedder, x: np.ndarray, plan_: Plan, *, store_dtype: str = "float32",
                spill_dir: str | None = None, check: Callable[[np.ndarray], None] | None = None,
                progress: Callable[[int], None] | None = None) -> EmbeddingStore:
    """An EmbeddingStore of images x (n, 3, H, W), ``plan_.batch`` images per call."""
    n, _, h, w = x.shape
    store = EmbeddingStore(n, emb.dims(h, w), dtype=store_dtype, spill=plan_.spill, spill_dir=spill_dir)
    for start in range(0, n, plan_.batch):
        part = x[start:start + plan_.batch]
        if check is not None:
            check(part)
        store.put(slice(start, start + len(part)), emb(part))
        if progress is not None:
            progress(len(part))
    return store


def gemm_device(engine: Any) -> str:
    """Where the blocks are multiplied: the engine's GPU ("cuda:<id>") when it runs on one
    and torch can reach it, else "cpu" (said in docs/matrix.md and by the command line)."""
    if not engine.on_gpu:
        return "cpu"
    import torch

    return f"cuda:{engine.options.device_id}" if torch.cuda.is_available() else "cpu"


def _gemm_form(a: np.ndarray, b: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(|a_i − b_j|² by the GEMM form, |a_i − μ|² + |b_j − μ|²), both float64 (p×q).

    Both blocks are first centred on μ, the mean row of b: distances do not change,
    but the norms that cancel shrink from |a|² + |b|² to the spread around μ, so the
    float32 GEMM's rounding (about eps32 times that sum) is that much smaller.
    """
    import torch

    ta = torch.from_numpy(a)
    tb = ta if b is a else torch.from_numpy(b)
    if device != "cpu":
        ta = ta.to(device, non_blocking=True)
        tb = ta if b is a else tb.to(device, non_blocking=True)
    mu = tb.mean(dim=0)  # any vector keeps the distances; the mean keeps the norms small
    ca = ta - mu
    cb = ca if b is a else tb - mu
    na = _sq_norms(ca)
    nb = na if b is a else _sq_norms(cb)
    scale = na[:, None] + nb[None, :]
    d = scale - 2.0 * (ca @ cb.T).to(torch.float64)
    return d.cpu().numpy(), scale.cpu().numpy()


def _sq_norms(t: Any, rows: int = 32) -> Any:
    """Σ t_i² per row in float64, a few rows at a time (no full-size temporary)."""
    import torch

    return torch.cat([(c * c).sum(dim=1, dtype=torch.float64) for c in t.split(rows)])


def sq_distances(a: np.ndarray, b: np.ndarray, *, device: str = "cpu",
                 diagonal: bool = False) -> tuple[np.ndarray, int]:
    """|a_i − b_j|² (float64, p×q) and how many entries were recomputed from the difference.
    diagonal: a is b (a diagonal block of a symmetric matrix): the diagonal is 0."""
    d, scale = _gemm_form(a, b, device)
    near = d < NEAR * scale
    if diagonal:
        np.fill_diagonal(near, False)
    rows, cols = np.nonzero(near)
    if rows.size:
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        for i, js in zip(rows[starts], np.split(cols, starts[1:])):
            diff = (b[js] - a[i]).astype(np.float64)  # the stored values, not the centred ones
            d[i, js] = np.einsum("ij,ij->i", diff, diff)
    np.maximum(d, 0.0, out=d)
    if diagonal:
        np.fill_diagonal(d, 0.0)
    return d, int(rows.size)


def blocks(ex: EmbeddingStore, ey: EmbeddingStore | None, weights: dict[str, float], block: int, *,
           device: str = "cpu", stats: dict | None = None) -> Iterator[tuple[slice, slice, dict[str, np.ndarray]]]:
    """(rows, cols, {term: d, "total": d}) float64 blocks; for ey None only blocks on or
    above the diagonal (the caller mirrors them). Rows or columns of images without an
    embedding are NaN."""
    sym = ey is None
    other = ex if sym else ey
    for i0 in range(0, ex.n, block):
        r = slice(i0, min(i0 + block, ex.n))
        for j0 in range(i0 if sym else 0, other.n, block):
            c = slice(j0, min(j0 + block, other.n))
            diag = sym and i0 == j0
            out: dict[str, np.ndarray] = {}
            total = None
            for t, w in weights.items():
                a = ex.block(t, r)
                b = a if diag else other.block(t, c)
                d, redone = sq_distances(a, b, device=device, diagonal=diag)
                if stats is not None:
                    stats["recomputed"] = stats.get("recomputed", 0) + redone
                out[t] = d
                total = w * d if total is None else total + w * d
            out["total"] = total
            bad_r, bad_c = ~ex.valid[r], ~other.valid[c]
            if bad_r.any() or bad_c.any():
                for d in out.values():
                    d[bad_r, :] = np.nan
                    d[:, bad_c] = np.nan
            yield r, c, out


def assemble(ex: EmbeddingStore, ey: EmbeddingStore | None, weights: dict[str, float], block: int, *,
             device: str = "cpu", stats: dict | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """The full matrices {term: (n, m) float32, "total": ...}; symmetric when ey is None."""
    m = ex.n if ey is None else ey.n
    out = {t: np.empty((ex.n, m), dtype=np.float32) for t in (*weights, "total")}
    for r, c, d in blocks(ex, ey, weights, block, device=device, stats=stats):
        for t, v in d.items():
            if ey is None and r.start == c.start:  # a diagonal block: mirror its upper triangle
                v = np.triu(v) + np.triu(v, 1).T
            out[t][r, c] = v
            if ey is None and r.start != c.start:
                out[t][c, r] = out[t][r, c].T  # the same float32 values: exactly symmetric
        if progress is not None:  # entries filled, mirrored ones included
            progress((r.stop - r.start) * (c.stop - c.start) * (2 if ey is None and r.start != c.start else 1))
    return out


def matrix(engine: Any, x: Any, y: Any = None, *, batch_size: int = DEFAULT_BATCH,
           store_dtype: str = "float32", spill: bool | None = None, spill_dir: str | None = None,
           block: int | None = None, stats: dict | None = None) -> dict[str, np.ndarray]:
    """Engine.matrix: see its docstring."""
    for name, value, none_ok in (("batch_size", batch_size, False), ("block", block, True)):
        if value is None and none_ok:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}={value!r} is not accepted; accepted: an integer >= 1"
                              f"{' or None (sized under the memory budget)' if none_ok else ''}.")
    emb = Embedder.of(engine)
    x = _host_images(x, "x")
    y = None if y is None else _host_images(y, "y")
    if y is not None and x.shape[1:] != y.shape[1:]:
        raise InputError(f"x holds {x.shape[2]}x{x.shape[3]} images and y {y.shape[2]}x{y.shape[3]}; "
                         "a distance matrix compares positions, so every image needs one size. "
                         "Resize or crop them to one size first.")
    n, _, h, w = x.shape
    p = plan(engine, emb, n, 0 if y is None else len(y), h, w, batch_size=batch_size, block=block,
             store_dtype=store_dtype, spill=spill)

    def check(part: np.ndarray, name: str = "x") -> None:
        check_tensor(part, name, engine.spec, dtypes=("float32",), max_pixels=engine.max_pixels,
                     check_range=engine.check_range)

    kw = dict(store_dtype=store_dtype, spill_dir=spill_dir, check=check)
    device = gemm_device(engine)
    with embed_array(emb, x, p, **kw) as ex:
        if y is None:
            return assemble(ex, None, emb.weights, p.block, device=device, stats=stats)
        kw["check"] = lambda part: check(part, "y")
        with embed_array(emb, y, p, **kw) as ey:
            return assemble(ex, ey, emb.weights, p.block, device=device, stats=stats)


def _host_images(v: Any, name: str) -> np.ndarray:
    if not isinstance(v, np.ndarray):
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        else:
            raise InputError(f"{name} is a {type(v).__name__}; accepted: a float32 array or tensor "
                             "(N, 3, H, W).")
    if v.ndim != 4 or v.shape[0] < 1:
        raise InputError(f"{name} has shape {tuple(v.shape)}; accepted: (N, 3, H, W) with N >= 1.")
    return v
