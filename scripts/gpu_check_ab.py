"""Stage ``ab`` of scripts/gpu_check.py: which CUDA provider options make the engine fastest,
each row checked against float32 PyTorch (TF32 off).

Workloads at 224², batch 8 (dry run: 32², batch 1), on the checks' network (VGG19 to
relu4_4, random weights; the content + style loss of the bench's train workload):
features, distance, and train (the distance with ``grad.x``).

ONNX Runtime rows, one InferenceSession each, its CUDA options from the project's own
``ProviderOptions``/``cuda_options`` (``for_model`` is left out on purpose: the ``tc-off``
rows are float16 models with use_tf32=0, the first H200 run's configuration):

- layout NCHW or NHWC (``prefer_nhwc``), ``+bias`` (``fuse_conv_bias``), ``tc-off``
  (use_tf32=0: no tensor cores at all in ORT 1.20+), ``A`` (HEURISTIC) against ``B``
  (EXHAUSTIVE, ``fixed_shapes``): since ORT 1.20 two cuDNN-frontend heuristic modes;
- ``+graph`` (CUDA graph), ``numpy`` (host I/O through session.run) against IO binding;
- features also: ``ort16o`` (float16 outputs: the output Casts made no-ops) against float32
  outputs, and the float32 model with TF32 on and off;
- the Engine as shipped (default options; ``fixed_shapes`` + ``cuda_graph``).

PyTorch rows: float16 channels_last, the same with ``cudnn.benchmark`` (train: AMP, the
loss terms in float32 outside autocast, as the bench does). torch.compile is in the
bench stage.

Diagnostics per workload: the op types placed on the CPU and Memcpy mentions (NCHW and
NHWC sessions), the NHWC graph after the layout transformation
(``session.debug_layout_transformation``), and the top kernels (torch.profiler) of torch
fp16-cl, the ``tc-off`` row and the NHWC ``+bias`` row.

Tiers (bench/tiers.py): float16 1e-2 on terms and taps, 5e-2 on ``grad.x`` with 1% of
its elements forgiven; TF32 the same; strict float32 1e-4.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

WORKLOADS = ("features", "distance", "train")
MODEL = {"features": "features16", "distance": "distance16", "train": "train16"}


# -- models -------------------------------------------------------------------------------

def fp16_outputs(src: str, dst: str) -> int:
    """A copy of ``src`` whose outputs made by Cast(FLOAT16 -> FLOAT) are float16 (the Cast
    becomes a no-op that ORT's CastElimination drops); returns how many changed. The
    metadata is dropped: the copy is for plain ONNX Runtime sessions only."""
    import onnx
    from onnx import TensorProto, shape_inference

    m = onnx.load(src)
    types = {v.name: v.type.tensor_type.elem_type for v in shape_inference.infer_shapes(m).graph.value_info}
    types.update({i.name: i.type.tensor_type.elem_type for i in m.graph.input})
    prod = {o: n for n in m.graph.node for o in n.output}
    changed = 0
    for out in m.graph.output:
        node = prod.get(out.name)
        if node is None or node.op_type != "Cast" or types.get(node.input[0]) != TensorProto.FLOAT16:
            continue
        for a in node.attribute:
            if a.name == "to":
                a.i = TensorProto.FLOAT16
        out.type.tensor_type.elem_type = TensorProto.FLOAT16
        changed += 1
    del m.metadata_props[:]
    onnx.save(m, dst)
    return changed


def model_paths(models: Any, dry_run: bool) -> dict[str, str]:
    """The A/B's models from the checks' cache. The dry run exports only the float16
    features graph (cheap); the float32 distance graphs stand in for the float16 ones."""
    half = "float32" if dry_run else "float16"
    paths = {"features32": models.get("features", "float32"), "features16": models.get("features", "float16"),
             "distance16": models.get("distance", half), "train16": models.get("distance", half, grad=True)}
    paths["features16o"] = os.path.join(os.path.dirname(paths["features16"]), "ab-features16o.onnx")
    if not os.path.exists(paths["features16o"]):
        fp16_outputs(paths["features16"], paths["features16o"])
    return paths


# -- rows ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class OrtRow:
    model: str  # a key of model_paths
    nhwc: bool = False
    bias: bool = False  # fuse_conv_bias
    tc: bool = True  # use_tf32: with 0, ORT 1.20+ runs no tensor-core engine, float16 included
    algo: str = "B"  # B: EXHAUSTIVE (fixed_shapes), A: HEURISTIC
    graph: bool = False
    io: str = "bind"  # bind | numpy

    @property
    def name(self) -> str:
        dt = {"features32": "ort32", "features16o": "ort16o"}.get(self.model, "ort16")
        parts = [dt, "nhwc" if self.nhwc else "nchw", self.algo]
        parts += ["+bias"] * self.bias + ["tc-off" if self.model != "features32" else "tf32-off"] * (not self.tc)
        parts += ["+graph"] * self.graph + ["numpy"] * (self.io == "numpy")
        return " ".join(parts)

    @property
    def tier(self) -> str:
        if self.model == "features32":
            return "tf32" if self.tc else "fp32"
        return "fp16"

    def providers(self, gpu: bool) -> list:
        """The session's providers: the project's CUDA option dict for these knobs."""
        if not gpu:
            return ["CPUExecutionProvider"]
        from perceptual_engine.runtime import providers as P

        o = P.ProviderOptions(fixed_shapes=self.algo == "B", tf32=self.tc, prefer_nhwc=self.nhwc,
                              fuse_conv_bias=self.bias, cuda_graph=self.graph)
        return [("CUDAExecutionProvider", P.cuda_options(o)), "CPUExecutionProvider"]


def plan(workload: str, dry_run: bool = False) -> list[Any]:
    """A workload's rows, the most telling first (the budget cuts from the end). The dry run
    keeps one row of each kind (every code path, in seconds)."""
    m = MODEL[workload]
    if dry_run:
        rows = ["torch fp16-cl", OrtRow(m, tc=False), OrtRow(m, nhwc=True, bias=True, algo="A"),
                OrtRow(m, bias=True, graph=True), OrtRow(m, io="numpy"), "engine default", "engine fixed+graph"]
        return rows + ([OrtRow("features16o"), OrtRow("features32")] if workload == "features" else [])
    rows: list[Any] = ["torch fp16-cl", OrtRow(m, tc=False), OrtRow(m), OrtRow(m, nhwc=True, tc=False),
                       OrtRow(m, nhwc=True), OrtRow(m, nhwc=True, bias=True), OrtRow(m, bias=True),
                       OrtRow(m, algo="A"), OrtRow(m, nhwc=True, bias=True, algo="A"),
                       OrtRow(m, bias=True, graph=True), OrtRow(m, nhwc=True, bias=True, graph=True),
                       OrtRow(m, io="numpy"), "engine default", "engine fixed+graph", "torch fp16-cl-autotune"]
    if workload == "features":
        rows[7:7] = [OrtRow("features16o"), OrtRow("features16o", nhwc=True, bias=True),
                     OrtRow("features16o", bias=True, graph=True), OrtRow("features32"),
                     OrtRow("features32", tc=False)]
    return rows


def diag_picks(workload: str, gpu: bool = True) -> list[str]:
    """The rows whose kernels are profiled (on the CPU, where the profiler sees torch's ops
    only, torch's row)."""
    m = MODEL[workload]
    return ["torch fp16-cl"] + ([OrtRow(m, tc=False).name, OrtRow(m, nhwc=True, bias=True).name] if gpu else [])


# -- reference and checks -----------------------------------------------------------------

def reference(workload: str, net: Any, x: Any, y: Any) -> dict[str, Any]:
    """float32 PyTorch with TF32 off: what every row is checked against."""
    import torch

    from perceptual_engine import losses
    from perceptual_engine.bench.tiers import strict_fp32

    with strict_fp32():
        feats = net.features
        if workload == "features":
            with torch.no_grad():
                return {k: v.clone() for k, v in feats.extract(x).items()}
        if workload == "distance":
            with torch.no_grad():
                return dict(losses.distance_terms(*feats.extract_pair(x, y), net.loss))
        xx = x.detach().clone().requires_grad_(True)
        with torch.no_grad():
            fy = feats.extract(y)
        out = losses.distance_terms(feats.extract(xx), fy, net.loss)
        out["total"].sum().backward()
        res = {k: v.detach() for k, v in out.items()}
        res["grad.x"] = xx.grad.detach()
        return res


def errors(got: dict[str, Any], ref: dict[str, Any], forgive: float) -> tuple[float, float | None]:
    """(max relative error of the terms or taps, grad.x's with ``forgive`` of it left out)."""
    from perceptual_engine.export.verify import compare

    def host(v: Any) -> np.ndarray:
        if isinstance(v, np.ndarray):
            return v.astype(np.float64)
        return v.detach().float().contiguous().cpu().numpy().astype(np.float64)

    terms, grad = 0.0, None
    for name, want in ref.items():
        if name not in got or tuple(got[name].shape) != tuple(want.shape):
            return float("inf"), None
        e = compare(host(got[name]), host(want), forgive if name == "grad.x" else 0.0).max_rel
        if name == "grad.x":
            grad = e
        else:
            terms = max(terms, e)
    return terms, grad


# -- runners ------------------------------------------------------------------------------

def ort_runner(path: str, row: OrtRow, feeds: dict[str, Any], ref: dict[str, Any], gpu: bool):
    """(session, call, outputs) of one configured session: IO binding of the torch tensors
    by pointer into preallocated torch outputs (what a CUDA graph needs), or numpy."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=row.providers(gpu))
    if gpu and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"the session runs {sess.get_providers()}, not CUDA")
    kinds = {"tensor(float16)": (torch.float16, np.float16), "tensor(float)": (torch.float32, np.float32)}
    ins = {i.name: kinds[i.type] for i in sess.get_inputs()}
    outs = {o.name: kinds[o.type] for o in sess.get_outputs()}
    names = list(outs)
    if row.io == "numpy":
        host = {k: feeds[k].to(ins[k][0]).cpu().numpy() for k in ins}
        result: dict[str, Any] = {}

        def call() -> None:
            result.update(zip(names, sess.run(names, host)))

        return sess, call, result
    dev = "cuda" if gpu else "cpu"
    bound_in = {k: feeds[k].to(ins[k][0]).contiguous() for k in ins}
    bound_out = {k: torch.empty(tuple(ref[k].shape), dtype=outs[k][0], device=feeds["x"].device)
                 for k in names if k in ref}
    binding = sess.io_binding()
    for k, t in bound_in.items():
        binding.bind_input(k, dev, 0, ins[k][1], tuple(t.shape), t.data_ptr())
    for k in names:
        if k in bound_out:
            t = bound_out[k]
            binding.bind_output(k, dev, 0, outs[k][1], tuple(t.shape), t.data_ptr())
        else:
            binding.bind_output(k, dev)

    def call_bound(_alive=(bound_in, bound_out)) -> None:  # the bound buffers live with the call
        sess.run_with_iobinding(binding)

    return sess, call_bound, bound_out


def torch_runner(workload: str, mode: str, net: Any, x: Any, y: Any) -> Callable[[], Any]:
    """float16 channels_last (``fp16-cl``), with cuDNN autotuning (``fp16-cl-autotune``:
    torch.backends.cudnn.benchmark on around each call). train: AMP as the bench runs it
    (bench/training.py), the loss terms in float32 outside autocast."""
    import copy

    import torch

    from perceptual_engine import losses
    from perceptual_engine.bench import training

    cl = torch.channels_last
    xs, ys = x.contiguous(memory_format=cl), y.contiguous(memory_format=cl)
    if workload == "train":
        model = SimpleNamespace(features=copy.deepcopy(net.features).to(memory_format=cl), loss=net.loss)
        terms = training.terms_fn(SimpleNamespace(workload=SimpleNamespace(name="train")), model,
                                  snippet=False, amp=torch.float16)

        def inner() -> Any:
            return training.value_and_grad(terms, {"x": xs, "y": ys}, amp=torch.float16)
    else:
        feats = copy.deepcopy(net.features).to(dtype=torch.float16, memory_format=cl)

        def inner() -> Any:
            with torch.inference_mode():
                if workload == "features":
                    return feats.extract(xs)
                return losses.distance_terms(*feats.extract_pair(xs, ys), net.loss)

    if mode != "fp16-cl-autotune":
        return inner

    def tuned() -> Any:
        old = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            return inner()
        finally:
            torch.backends.cudnn.benchmark = old

    return tuned


def engine_runner(path: str, workload: str, tuned: bool, x: Any, y: Any, gpu: bool):
    from perceptual_engine.runtime import Engine, ProviderOptions

    eng = Engine(path, "cuda" if gpu else "cpu",
                 options=ProviderOptions(fixed_shapes=True, cuda_graph=True) if tuned else None)
    if workload == "features":
        return eng, lambda: eng.features(x)
    return eng, lambda: eng.distance(x, y)


def timed(call: Callable[[], Any], sync: Callable[[], None], max_iters: int, target_s: float,
          warmup: int = 3) -> list[float]:
    """ms per call after ``warmup`` calls (a CUDA graph's capture among them), each timed
    between two synchronizations, as the bench does."""
    for _ in range(warmup):
        call()
    sync()
    t = time.perf_counter()
    call()
    sync()
    n = int(min(max_iters, max(2, target_s / max(time.perf_counter() - t, 1e-6))))
    ms = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        call()
        sync()
        ms.append((time.perf_counter() - t) * 1e3)
    return ms


# -- the stage ----------------------------------------------------------------------------

def run_workload(workload: str, ctx: SimpleNamespace, deadline: float) -> dict:
    """The rows of ``workload`` until ``ctx.diag_s`` before ``deadline`` (time.perf_counter()),
    then its diagnostics until ``deadline``."""
    import torch

    from perceptual_engine.bench.tiers import GRAD_FORGIVE, GRAD_TOLERANCE, TOLERANCE

    gpu, sync = ctx.gpu, ctx.sync
    ref = reference(workload, ctx.net, ctx.x, ctx.y)
    rows, keep = [], {}
    for item in plan(workload, not gpu):
        label = item if isinstance(item, str) else item.name
        tier = item.tier if isinstance(item, OrtRow) else "fp16"
        row: dict = {"workload": workload, "variant": label, "tier": tier}
        rows.append(row)
        if time.perf_counter() > deadline - ctx.diag_s:
            row["note"] = "skipped: budget"
            continue
        if isinstance(item, OrtRow) and item.graph and not gpu:
            row["note"] = "n/a on the CPU provider (CUDA graph)"
            continue
        holder, box = None, {}
        try:
            t = time.perf_counter()
            if isinstance(item, OrtRow):
                holder, run, box["out"] = ort_runner(ctx.paths[item.model], item, {"x": ctx.x, "y": ctx.y}, ref, gpu)
                call = run
            elif label.startswith("engine"):
                holder, fn = engine_runner(ctx.paths[MODEL[workload]], workload, label.endswith("graph"),
                                           ctx.x, ctx.y, gpu)

                def call(fn=fn, box=box) -> None:
                    box["out"] = fn()
            else:
                fn = torch_runner(workload, label.split()[1], ctx.net, ctx.x, ctx.y)

                def call(fn=fn, box=box) -> None:
                    box["out"] = fn()
            call()
            sync()
            row["build_s"] = round(time.perf_counter() - t, 2)
            ms = timed(call, sync, ctx.iters, ctx.target_s, ctx.warmup)
            row["median_ms"] = float(np.median(ms))
            row["p90_ms"] = float(np.percentile(ms, 90)) if len(ms) >= 10 else None
            terms, grad = errors(box["out"], ref, GRAD_FORGIVE[tier])
            row["err_terms"], row["err_grad"] = terms, grad
            wrong = [f"terms>{TOLERANCE[tier]:g}"] * (not terms <= TOLERANCE[tier])
            wrong += [f"grad.x>{GRAD_TOLERANCE[tier]:g}"] * (grad is not None and not grad <= GRAD_TOLERANCE[tier])
            row["wrong"] = wrong
            if label in diag_picks(workload, gpu):  # the call keeps its session or engine alive
                keep[label] = call
        except Exception as exc:  # noqa: BLE001 - a row that fails is a finding; the stage goes on
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            row["note"] = f"error: {type(exc).__name__}: {first}"
        finally:
            holder = box = None
            gc.collect()
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    diag = diagnostics(workload, ctx, keep, deadline)
    keep.clear()
    gc.collect()
    return {"rows": rows, "diagnostics": diag}


def diagnostics(workload: str, ctx: SimpleNamespace, keep: dict, deadline: float) -> dict:
    import gpu_check_diag as D

    out: dict = {}
    m = MODEL[workload]
    for row in (OrtRow(m), OrtRow(m, nhwc=True, bias=True))[: 2 if ctx.gpu or workload == "train" else 0]:
        if time.perf_counter() > deadline:
            out[f"placement {row.name}"] = "skipped: budget"
            continue
        try:
            out[f"placement {row.name}"] = D.placement(ctx.paths[m], row.providers(ctx.gpu), debug_layout=row.nhwc)
        except Exception as exc:  # noqa: BLE001
            out[f"placement {row.name}"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    for label in diag_picks(workload, ctx.gpu):
        if label not in keep:
            continue
        if time.perf_counter() > deadline:
            out[f"kernels {label}"] = "skipped: budget"
            continue
        try:
            out[f"kernels {label}"] = D.kernel_table(keep[label], ctx.sync, ctx.gpu)
        except Exception as exc:  # noqa: BLE001
            out[f"kernels {label}"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return out


def run_ab(models: Any, dry_run: bool, budget_s: float) -> dict:
    """The A/B stage within ``budget_s``: each workload gets an equal share of what is left."""
    import torch

    from perceptual_engine.reference import TorchPerceptualLoss
    from perceptual_engine.weights import load_weights

    t0 = time.perf_counter()
    gpu = not dry_run
    paths = model_paths(models, dry_run)
    dev = "cuda" if gpu else "cpu"
    n, size = (1, 32) if dry_run else (8, 224)
    g = torch.Generator().manual_seed(1234)
    x = torch.rand(n, 3, size, size, generator=g).to(dev)
    y = torch.rand(n, 3, size, size, generator=g).to(dev)
    net = TorchPerceptualLoss(models.spec, models.loss, weights=load_weights(models.spec)).to(dev)
    ctx = SimpleNamespace(gpu=gpu, sync=torch.cuda.synchronize if gpu else (lambda: None), paths=paths,
                          net=net, x=x, y=y, iters=1 if dry_run else 30, target_s=0.05 if dry_run else 0.5,
                          warmup=0 if dry_run else 3,
                          diag_s=3.0 if dry_run else 10.0)  # of each workload's share, for diagnostics
    result: dict = {"batch": n, "size": size, "workloads": {}}
    for i, workload in enumerate(WORKLOADS):
        left = budget_s - (time.perf_counter() - t0)
        deadline = time.perf_counter() + left / (len(WORKLOADS) - i)
        result["workloads"][workload] = run_workload(workload, ctx, deadline)
    rows = [r for w in result["workloads"].values() for r in w["rows"]]
    result["wrong"] = [f"{r['workload']}/{r['variant']}: {', '.join(r['wrong'])}" for r in rows if r.get("wrong")]
    result["errors"] = [f"{r['workload']}/{r['variant']}: {r['note']}" for r in rows
                        if r.get("note", "").startswith("error")]
    result["markdown"] = render(rows, n, size, dry_run) + "\n\n" + render_diagnostics(result["workloads"])
    result["ok"] = not result["wrong"]
    return result


def render(rows: list[dict], n: int, size: int, dry_run: bool) -> str:
    base = {r["workload"]: r.get("median_ms") for r in rows if r["variant"] == "torch fp16-cl"}
    dry = ", dry run: CPU, timings mean nothing" if dry_run else ""
    lines = [f"#### A/B of the CUDA provider options ({n}x3x{size}²{dry})", "",
             "| workload | variant | median ms | p90 ms | torch fp16-cl / this | build s | err terms | err grad.x "
             "| note |", "|---|---|---|---|---|---|---|---|---|"]

    def f(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    for r in rows:
        med = r.get("median_ms")
        sp = f"{base[r['workload']] / med:.2f}x" if med and base.get(r["workload"]) else "—"
        note = " ".join([r.get("note", "")] + [f"WRONG {w}" for w in r.get("wrong", [])]).strip()
        lines.append(f"| {r['workload']} | {r['variant']} | {f(med, '.3f')} | {f(r.get('p90_ms'), '.3f')} | {sp} | "
                     f"{f(r.get('build_s'), '.1f')} | {f(r.get('err_terms'), '.1e')} | {f(r.get('err_grad'), '.1e')} | "
                     f"{note.replace('|', '/')} |")
    lines += ["", "ort16: float16 model, float32 outputs (in-graph Casts); ort16o: float16 outputs; ort32: float32 "
              "model. A/B: cudnn_conv_algo_search HEURISTIC/EXHAUSTIVE (cuDNN-frontend heuristic modes). tc-off: "
              "use_tf32=0, which in ONNX Runtime 1.20+ drops every tensor-core engine, float16 included; tf32-off: "
              "the same on the float32 model. +bias: fuse_conv_bias; +graph: CUDA graph; numpy: host I/O "
              "(session.run), every other ORT row IO binding."
              + (" Dry run: the distance and train rows run the float32 models." if dry_run else "")]
    return "\n".join(lines)


def render_diagnostics(workloads: dict) -> str:
    """Placement (CPU op types, Memcpy), the NHWC graph and the top kernels, as lines."""
    lines = ["Diagnostics:", ""]
    for workload, w in workloads.items():
        for name, d in w["diagnostics"].items():
            if not isinstance(d, dict):
                lines.append(f"- {workload}, {name}: {d}")
            elif name.startswith("placement"):
                text = f"nodes {d.get('nodes')}; on the CPU {d.get('cpu_op_types') or 'none'}; " \
                       f"Memcpy mentions {d.get('memcpy_mentions')}"
                if "layout" in d:
                    text += f"; after the layout transformation {d['layout']}"
                if d.get("error"):
                    text += f"; session failed: {d['error']}"
                if d.get("refusals"):
                    text += f"; {d['refusals']}"
                lines.append(f"- {workload}, {name}: {text}")
            else:
                lines.append(f"- {workload}, {name}: {d.get('total_ms')} ms per call over {d.get('names')} "
                             f"kernel names {d.get('note', '')}".rstrip())
                lines += [f"    - {k['ms']:.3f} ms x{k['per_call']} {k['name']}" for k in d.get("top", [])[:6]]
    return "\n".join(lines)
