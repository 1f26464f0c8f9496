"""Provider planning and option assembly, on a CPU machine with the GPU probes simulated."""
from __future__ import annotations

import dataclasses

import os

import pytest

from perceptual_engine.errors import ConfigError, DeviceError, PerceptualError
from perceptual_engine.runtime import providers as P
from perceptual_engine.runtime.providers import ProviderOptions, ShapeRange

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
INPUTS_D = ("x", "y")


def _key():
    return "0123456789abcdef"


@pytest.fixture
def machine(monkeypatch):
    """machine(gpus=1, providers=[...], trt=True): simulate what the probes report."""

    def set_(gpus=1, providers=(TRT, CUDA, CPU), trt=True):
        why = "" if gpus else "the NVIDIA driver library libcuda.so.1 is not loadable (no GPU driver)"
        monkeypatch.setattr(P, "cuda_gpu_count", lambda: (gpus, why))
        monkeypatch.setattr(P, "available_providers", lambda: list(providers))
        monkeypatch.setattr(P, "tensorrt_loadable",
                            lambda: (True, "") if trt else (False, "libnvinfer.so.10 is not loadable: "
                                                                  "cannot open shared object file"))

    return set_


def _names(chain):
    return [name for name, _ in chain]


# -- CUDA options -----------------------------------------------------------------------------


@pytest.fixture
def gpu_memory(monkeypatch):
    """The driver reports a GPU of 80 GB."""
    from perceptual_engine import cuda_driver

    monkeypatch.setattr(cuda_driver, "total_memory", lambda device_id=0: 80 * 10**9)


def test_cuda_options_defaults(gpu_memory):
    o = P.cuda_options(ProviderOptions())
    assert o["device_id"] == "0"
    assert o["cudnn_conv_algo_search"] == "HEURISTIC"
    assert o["prefer_nhwc"] == "0"  # NCHW unless measured faster (scripts/gpu_check.py)
    assert o["use_tf32"] == "1"
    assert o["enable_cuda_graph"] == "0"
    assert o["cudnn_conv_use_max_workspace"] == "0"  # bounded when shapes vary
    assert o["arena_extend_strategy"] == "kSameAsRequested"
    assert o["gpu_mem_limit"] == str(40 * 10**9)  # half the GPU by default
    assert "user_compute_stream" not in o
    assert all(isinstance(v, str) for v in o.values())  # ORT takes string option values


def test_gpu_mem_limit_bytes_fraction_or_none(monkeypatch, gpu_memory):
    assert P.cuda_options(ProviderOptions(gpu_mem_limit=0.25))["gpu_mem_limit"] == str(20 * 10**9)
    assert P.cuda_options(ProviderOptions(gpu_mem_limit=1 << 30))["gpu_mem_limit"] == str(1 << 30)
    assert "gpu_mem_limit" not in P.cuda_options(ProviderOptions(gpu_mem_limit=None))
    from perceptual_engine import cuda_driver

    monkeypatch.setattr(cuda_driver, "total_memory", lambda device_id=0: None)  # driver cannot tell
    assert "gpu_mem_limit" not in P.cuda_options(ProviderOptions())


@pytest.mark.parametrize("bad", [0, -1, 1.5, 0.0, True, "4G"])
def test_gpu_mem_limit_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match=r"gpu_mem_limit=.* is not accepted; accepted: bytes"):
        ProviderOptions(gpu_mem_limit=bad)


def test_workspace_is_one_bound_whatever_fixed_shapes(gpu_memory):
    # ORT 1.20+'s cuDNN-frontend Conv sizes the workspace by its plan and does not read
    # cudnn_conv_use_max_workspace: fixed_shapes no longer asks for (or counts) 2 GiB.
    assert P.workspace_bytes(ProviderOptions()) == P.CONV_WORKSPACE == 256 << 20
    assert P.workspace_bytes(ProviderOptions(fixed_shapes=True)) == P.CONV_WORKSPACE
    assert P.workspace_bytes(ProviderOptions(gpu_mem_limit=1 << 20)) == 1 << 20  # within the arena cap
    assert P.cuda_options(ProviderOptions(fixed_shapes=True))["cudnn_conv_use_max_workspace"] == "0"


def test_defaults_table_covers_and_matches_the_options():
    fields = {f.name: f.default for f in dataclasses.fields(ProviderOptions)}
    rows = {d.option: d for d in P.DEFAULTS}
    assert len(rows) == len(P.DEFAULTS)  # one row per option
    assert set(rows) == {"fixed_shapes", "tf32", "prefer_nhwc", "fuse_conv_bias", "cuda_graph",
                         "gpu_mem_limit", "share_torch_stream"}
    for name, row in rows.items():
        assert row.default == fields[name], name
        assert row.why and row.change_if
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "gpu.md")).read()
    for name, row in rows.items():  # docs/gpu.md shows the same defaults
        assert f"| `{name}` | `{row.default}` |" in docs, name


def test_prefer_nhwc_and_fuse_conv_bias_reach_the_cuda_provider(gpu_memory):
    o = P.cuda_options(ProviderOptions())
    assert (o["prefer_nhwc"], o["fuse_conv_bias"]) == ("0", "0")
    o = P.cuda_options(ProviderOptions(prefer_nhwc=True, fuse_conv_bias=True))
    assert (o["prefer_nhwc"], o["fuse_conv_bias"]) == ("1", "1")


@pytest.mark.parametrize("name", ["prefer_nhwc", "fuse_conv_bias", "tf32", "fixed_shapes", "cuda_graph"])
@pytest.mark.parametrize("bad", [1, "1", "true", None])
def test_switches_take_booleans_only(name, bad):
    with pytest.raises(ConfigError, match=rf"{name}=.* is not accepted; accepted: True or False"):
        ProviderOptions(**{name: bad})


def test_float16_models_keep_tensor_cores_whatever_tf32(gpu_memory):
    strict = ProviderOptions(tf32=False, prefer_nhwc=True)
    o, notes = P.for_model(strict, "float16")
    assert o == dataclasses.replace(strict, tf32=True) and P.cuda_options(o)["use_tf32"] == "1"
    assert len(notes) == 1 and "tensor-core" in notes[0] and "float16" in notes[0]
    assert P.for_model(strict, "float32") == (strict, ())  # float32: strict parity as asked
    assert P.for_model(ProviderOptions(), "float16") == (ProviderOptions(), ())


def test_cuda_options_fixed_shapes_and_flags():
    o = P.cuda_options(ProviderOptions(device_id=2, fixed_shapes=True, tf32=False, prefer_nhwc=False,
                                       cuda_graph=True, gpu_mem_limit=1 << 30, user_stream=123456))
    assert o["device_id"] == "2"
    assert o["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert o["use_tf32"] == "0" and o["prefer_nhwc"] == "0" and o["enable_cuda_graph"] == "1"
    assert o["gpu_mem_limit"] == str(1 << 30)
    assert o["has_user_compute_stream"] == "1" and o["user_compute_stream"] == "123456"


# -- TensorRT options -------------------------------------------------------------------------


def test_tensorrt_options(tmp_path):
    opts = ProviderOptions(cache_dir=str(tmp_path), shapes=ShapeRange((1, 32, 32), (2, 64, 96), (8, 128, 256)))
    o = P.tensorrt_options(opts, INPUTS_D, "abcd")
    assert o["trt_fp16_enable"] == "0"
    assert o["trt_engine_cache_enable"] == "1" and o["trt_timing_cache_enable"] == "1"
    cache = o["trt_engine_cache_path"]
    assert o["trt_timing_cache_path"] == cache
    assert os.path.dirname(cache) == str(tmp_path)
    assert os.path.basename(cache) == "abcd-fp32-1x32x32_2x64x96_8x128x256"
    assert o["trt_profile_min_shapes"] == "x:1x3x32x32,y:1x3x32x32"
    assert o["trt_profile_opt_shapes"] == "x:2x3x64x96,y:2x3x64x96"
    assert o["trt_profile_max_shapes"] == "x:8x3x128x256,y:8x3x128x256"
    assert o["trt_cuda_graph_enable"] == "0"
    assert all(isinstance(v, str) for v in o.values())


def test_tensorrt_cache_keyed_by_model_precision_and_profile(tmp_path):
    base = ProviderOptions(cache_dir=str(tmp_path))
    paths = {
        P.tensorrt_options(base, ("x",), "model-a")["trt_engine_cache_path"],
        P.tensorrt_options(base, ("x",), "model-b")["trt_engine_cache_path"],
        P.tensorrt_options(ProviderOptions(cache_dir=str(tmp_path), fp16=True), ("x",), "model-a")[
            "trt_engine_cache_path"],
        P.tensorrt_options(ProviderOptions(cache_dir=str(tmp_path), shapes=ShapeRange(max=(4, 512, 512))),
                           ("x",), "model-a")["trt_engine_cache_path"],
    }
    assert len(paths) == 4
    assert P.tensorrt_options(ProviderOptions(fp16=True, cuda_graph=True), ("x",), "k")["trt_fp16_enable"] == "1"
    # Same inputs, same key: the same cache (reuse across runs).
    assert (P.tensorrt_options(base, ("x",), "model-a")["trt_engine_cache_path"]
            == P.tensorrt_options(base, ("x",), "model-a")["trt_engine_cache_path"])


def test_tensorrt_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PERCEPTUAL_ENGINE_CACHE", str(tmp_path / "pe"))
    o = P.tensorrt_options(ProviderOptions(), ("x",), "k")
    assert o["trt_engine_cache_path"].startswith(os.path.join(str(tmp_path / "pe"), "tensorrt", "k-fp32-"))
    monkeypatch.delenv("PERCEPTUAL_ENGINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert P.default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "perceptual-engine")


def test_profile_strings_single_input():
    prof = ShapeRange().profile(("x",))
    assert prof == {
        "trt_profile_min_shapes": "x:1x3x32x32",
        "trt_profile_opt_shapes": "x:1x3x224x224",
        "trt_profile_max_shapes": "x:8x3x512x512",  # modest: TensorRT builds for the whole range
    }


def test_tensorrt_profile_covers_target_content_inputs(tmp_path):
    inputs = P.profile_inputs("vgg19", ("x", "target.content.relu2_2", "target.content.relu3_4",
                                        "target.gram.relu1_2"))
    assert [i.name for i in inputs] == ["x", "target.content.relu2_2", "target.content.relu3_4"]
    opts = ProviderOptions(cache_dir=str(tmp_path), shapes=ShapeRange((1, 33, 47), (2, 224, 160), (4, 512, 300)))
    o = P.tensorrt_options(opts, inputs, "k")
    assert o["trt_profile_min_shapes"] == ("x:1x3x33x47,target.content.relu2_2:1x128x16x23,"
                                           "target.content.relu3_4:1x256x8x11")
    assert o["trt_profile_opt_shapes"] == ("x:2x3x224x160,target.content.relu2_2:1x128x112x80,"
                                           "target.content.relu3_4:1x256x56x40")
    assert o["trt_profile_max_shapes"] == ("x:4x3x512x300,target.content.relu2_2:1x128x256x150,"
                                           "target.content.relu3_4:1x256x128x75")


@pytest.mark.parametrize("kw", [
    dict(min=(2, 32, 32), opt=(1, 64, 64)),
    dict(opt=(1, 224, 2048)),
    dict(min=(1, 300, 32)),
    dict(max=(1, 1024, 1024), opt=(4, 224, 224)),
    dict(min=(1, 32)),
])
def test_shape_range_must_be_ordered(kw):
    with pytest.raises(ConfigError, match=r"min .* <= opt .* <= max .* does not hold; give \(batch, "
                                          r"height, width\) triples ordered element-wise"):
        ShapeRange(**kw)


def test_shape_range_equal_bounds_allowed():
    ShapeRange((2, 64, 64), (2, 64, 64), (2, 64, 64))


# -- plan -----------------------------------------------------------------------------------


def test_plan_cpu_needs_no_probe(monkeypatch):
    def boom():
        raise AssertionError("the CPU plan must not probe the GPU")

    monkeypatch.setattr(P, "cuda_gpu_count", boom)
    monkeypatch.setattr(P, "available_providers", boom)
    assert P.plan("cpu", ProviderOptions(), ("x",), _key) == [(CPU, {})]


def test_plan_unknown_device():
    with pytest.raises(ConfigError, match=r"device 'gpu' is not accepted; accepted: auto, cpu, cuda, tensorrt"):
        P.plan("gpu", ProviderOptions(), ("x",), _key)


def test_auto_on_gpu_machine_tries_tensorrt_cuda_cpu(machine):
    machine()
    chain = P.plan("auto", ProviderOptions(fixed_shapes=True), INPUTS_D, _key)
    assert _names(chain) == [TRT, CUDA, CPU]
    assert chain[0][1]["trt_profile_min_shapes"].startswith("x:")
    assert "0123456789abcdef-fp32-" in chain[0][1]["trt_engine_cache_path"]
    assert chain[1][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"


def test_auto_without_tensorrt_library(machine):
    machine(trt=False)
    assert _names(P.plan("auto", ProviderOptions(), ("x",), _key)) == [CUDA, CPU]


def test_auto_with_cpu_only_onnxruntime(machine):
    machine(providers=[CPU])
    assert _names(P.plan("auto", ProviderOptions(), ("x",), _key)) == [CPU]


def test_auto_without_gpu_is_cpu_only_and_asks_nothing_else(machine, monkeypatch):
    machine(gpus=0)
    asked = []
    monkeypatch.setattr(P, "tensorrt_loadable", lambda: asked.append(1) or (True, ""))
    chain = P.plan("auto", ProviderOptions(), ("x",), lambda: asked.append("key") or "k")
    assert chain == [(CPU, {})]
    assert asked == []  # no TensorRT probe, no model hash


def test_explicit_cuda(machine):
    machine()
    chain = P.plan("cuda", ProviderOptions(), ("x",), _key)
    assert _names(chain) == [CUDA, CPU]
    assert chain[0][1] == P.cuda_options(ProviderOptions())


def test_explicit_tensorrt(machine):
    machine()
    chain = P.plan("tensorrt", ProviderOptions(fp16=True), ("x",), _key)
    assert _names(chain) == [TRT, CUDA, CPU]
    assert chain[0][1]["trt_fp16_enable"] == "1"


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_explicit_gpu_without_gpu(machine, device):
    machine(gpus=0)
    with pytest.raises(DeviceError, match=rf"device '{device}' needs a CUDA GPU, but the NVIDIA driver "
                                          r"library libcuda\.so\.1 is not loadable.*Use device='cpu'") as exc:
        P.plan(device, ProviderOptions(), ("x",), _key)
    assert isinstance(exc.value, PerceptualError)


@pytest.mark.parametrize("device, name", [("cuda", CUDA), ("tensorrt", TRT)])
def test_explicit_gpu_without_the_provider_in_onnxruntime(machine, device, name):
    machine(providers=[CPU])
    with pytest.raises(DeviceError, match=rf"device '{device}' needs {name}, but this onnxruntime build "
                                          r"offers \['CPUExecutionProvider'\].*pip install onnxruntime-gpu"):
        P.plan(device, ProviderOptions(), ("x",), _key)


def test_explicit_tensorrt_without_tensorrt(machine):
    machine(trt=False)
    with pytest.raises(DeviceError, match=r"device 'tensorrt' needs TensorRT 10 \(libnvinfer\.so\.10 is not "
                                          r"loadable.*or use device='cuda'"):
        P.plan("tensorrt", ProviderOptions(), ("x",), _key)


def test_this_machine_auto_plan_is_consistent():
    # Whatever this machine is, "auto" never plans a GPU provider without a GPU.
    chain = P.plan("auto", ProviderOptions(), ("x",), _key)
    assert _names(chain)[-1] == CPU
    if P.cuda_gpu_count()[0] == 0:
        assert chain == [(CPU, {})]


def test_probes_return_reasons():
    n, why = P.cuda_gpu_count()
    assert n >= 0 and (n > 0 or why)
    ok, why_trt = P.tensorrt_loadable()
    assert ok or "libnvinfer" in why_trt
    assert isinstance(P.missing_cuda_libraries(), list)


def test_engine_with_a_float16_model_and_tf32_off_keeps_tensor_cores_and_says_so(features_model, monkeypatch):
    from perceptual_engine.runtime import engine as E

    real = E.read_info
    monkeypatch.setattr(E, "read_info", lambda path: dataclasses.replace(real(path), dtype="float16"))
    seen = []
    plan = P.plan
    monkeypatch.setattr(P, "plan", lambda device, options, *a: seen.append(options) or plan(device, options, *a))
    eng = E.Engine(features_model[0], "cpu", options=ProviderOptions(tf32=False))
    assert eng.requested_options.tf32 is False  # not an error: what was asked stays readable
    assert eng.options.tf32 is True and seen[0].tf32 is True  # what the providers get
    assert eng.option_notes and "tensor-core" in eng.describe()
    monkeypatch.setattr(E, "read_info", real)
    plain = E.Engine(features_model[0], "cpu", options=ProviderOptions(tf32=False))
    assert plain.options.tf32 is False and plain.option_notes == ()


@pytest.mark.parametrize("arch, layer", [("alexnet", "relu2"), ("squeezenet1_1", "fire5")])
def test_tensorrt_profile_of_a_strided_trunk_uses_the_exact_feature_size(arch, layer):
    # AlexNet's 11x11/4 conv and 3x3/2 pools (SqueezeNet's in ceil mode) are not H // downsample:
    # the profile's feature sides are the torchvision module's own output sides.
    import torch
    import torchvision

    from perceptual_engine import layers as L

    inputs = P.profile_inputs(arch, ("x", f"target.content.{layer}"))
    prof = ShapeRange((1, 67, 83), (1, 224, 224), (2, 301, 257)).profile(inputs)
    net = getattr(torchvision.models, arch)().features.eval()
    index = next(i.index for i in L.table(arch) if i.name == layer)
    down, approx_off = L.resolve(arch, layer).downsample, False
    for key, (n, h, w) in zip(("min", "opt", "max"), ((1, 67, 83), (1, 224, 224), (2, 301, 257))):
        with torch.no_grad():
            want = net[:index + 1](torch.zeros(1, 3, h, w)).shape
        assert prof[f"trt_profile_{key}_shapes"].endswith(f"target.content.{layer}:1x{want[1]}x{want[2]}x{want[3]}")
        approx_off |= (want[2], want[3]) != (h // down, w // down)
    assert approx_off  # the case this guards: H // downsample would have been wrong
