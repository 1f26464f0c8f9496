"""Shared fixtures: seeded data, torchvision VGGs with known weights, exported models.

Exports are the slow part of the suite, so every model is exported once per
session here and shared; most are shallow (up to relu3_x). Only the float16
models with scaled weights go through the whole of VGG19 up to relu4_4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptual_engine import FeatureSpec, LossConfig, export_onnx
from perceptual_engine.runtime import providers as P
from perceptual_engine.weights import load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A features model with conv taps next to the ReLUs that overwrite them in torchvision.
FEATURES_SPEC = FeatureSpec(
    arch="vgg19", layers=("conv1_1", "relu1_2", "relu2_2", "conv3_1", "relu3_1"),
    weights="random", seed=7,
)
DISTANCE_SPEC = FeatureSpec(
    arch="vgg19", layers=("relu1_2", "relu2_2", "relu3_1"), weights="random", seed=11,
)
DISTANCE_LOSS = LossConfig(
    content={"relu2_2": 1.0, "relu3_1": 0.5}, style={"relu1_2": 2.0, "relu3_1": 1.5}, gram="chw",
)
STYLE_LOSS = LossConfig(style={"relu1_2": 1.0, "relu3_1": 0.5}, gram="hw")
# Conv weights and biases of seeded random VGG19 weights are multiplied by this, so
# activations compound to the hundreds at relu4_4 (1.6**12 ~ 280).
FP16_SCALE = 1.6
# "chw": the default, where F is scaled by 1/sqrt(C·H·W) before the product.
FP16_LOSS = LossConfig(
    content={"relu2_2": 1.0, "relu4_4": 1.0},
    style={"relu1_2": 1.0, "relu3_4": 1.0, "relu4_4": 1.0},
    gram="chw",
)
# "none": raw Grams, which only float32 math can hold; shallow to keep the export cheap.
FP16_RAW_LAYERS = ("relu1_2", "relu2_2")
FP16_RAW_LOSS = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0, "relu2_2": 1.0}, gram="none")


def _gpu_available() -> bool:
    try:
        return P.cuda_gpu_count()[0] > 0 and "CUDAExecutionProvider" in P.available_providers()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and onnxruntime's CUDA provider")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not keywords: a folder named gpu matches those
            item.add_marker(skip)


# -- data -----------------------------------------------------------------------------------


@pytest.fixture
def make_images():
    """make_images(shape, seed=0, lo=0.0, hi=1.0) -> seeded uniform float32 NCHW array."""

    def make(shape, seed=0, lo=0.0, hi=1.0):
        rng = np.random.default_rng(seed)
        return rng.uniform(lo, hi, size=shape).astype(np.float32)

    return make


def rel_error(actual, expected) -> float:
    """max |a - b| / max |b|, in float64 (the export's own error measure)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.abs(b).max())
    assert scale > 0, "reference is all zeros: the comparison would prove nothing"
    return float(np.abs(a - b).max()) / scale


@pytest.fixture(scope="session")
def rel_err():
    return rel_error


# -- torchvision VGGs -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tv_features():
    """tv_features(arch) -> torchvision ``vgg*(weights=None).features`` with seeded weights.

    torchvision initializes biases to zero, which would hide a bias mapped to the
    wrong layer; they get seeded nonzero values here.
    """
    import torchvision

    cache: dict[str, torch.nn.Sequential] = {}

    def get(arch: str) -> torch.nn.Sequential:
        if arch not in cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed({"vgg19": 19, "vgg16": 16}[arch])
                model = getattr(torchvision.models, arch)(weights=None)
                feats = model.features.eval()
                del model
                for mod in feats:
                    if isinstance(mod, torch.nn.Conv2d):
                        with torch.no_grad():
                            mod.bias.copy_(torch.randn(mod.out_channels) * 0.05)
                for p in feats.parameters():
                    p.requires_grad_(False)
            cache[arch] = feats
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tv_state(tv_features):
    """tv_state(arch) -> a torchvision-format state dict ("features.N.weight") plus an
    extra classifier key that loaders must ignore."""

    def get(arch: str) -> dict[str, torch.Tensor]:
        state = {f"features.{k}": v.clone() for k, v in tv_features(arch).state_dict().items()}
        g = torch.Generator().manual_seed(5)
        state["classifier.6.bias"] = torch.randn(1000, generator=g)
        return state

    return get


@pytest.fixture(scope="session")
def tv_weights_file(tv_state, tmp_path_factory):
    """tv_weights_file(arch, ext) -> path of tv_state(arch) saved as .pth or .safetensors."""
    folder = tmp_path_factory.mktemp("tv_weights")
    cache: dict[tuple[str, str], str] = {}

    def get(arch: str, ext: str = ".pth") -> str:
        if (arch, ext) not in cache:
            path = folder / f"{arch}{ext}"
            state = tv_state(arch)
            if ext == ".safetensors":
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in state.items()}, str(path))
            else:
                torch.save(state, path)
            cache[(arch, ext)] = str(path)
        return cache[(arch, ext)]

    return get


def run_tv_by_hand(feats: torch.nn.Sequential, x: torch.Tensor, taps: dict[int, str], *,
                   input_range: str = "0,1", pooling: str = "max") -> dict[str, torch.Tensor]:
    """torchvision ``features`` run module by module, ImageNet normalization applied here.

    Outputs are cloned at the tapped index: torchvision's ReLUs run in place and
    would otherwise overwrite a tapped conv output.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    if input_range == "-1,1":
        x = (x + 1.0) / 2.0
    h = (x - mean) / std
    out: dict[int, torch.Tensor] = {}
    last = max(taps)
    with torch.no_grad():
        for i, mod in enumerate(feats):
            if i > last:
                break
            if isinstance(mod, torch.nn.MaxPool2d) and pooling == "avg":
                mod = torch.nn.AvgPool2d(2, 2)
            h = mod(h)
            if i in taps:
                out[i] = h.clone()
    return {name: out[i] for i, name in taps.items()}


@pytest.fixture(scope="session")
def tv_reference():
    return run_tv_by_hand


# -- exported models (one export each per session) ------------------------------------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def features_model(model_dir):
    """(path, spec, ExportResult) of a float32 features graph with conv and relu taps."""
    path = model_dir / "features.onnx"
    result = export_onnx(FEATURES_SPEC, path, graph="features")
    return str(path), FEATURES_SPEC, result


@pytest.fixture(scope="session")
def distance_model(model_dir):
    """(path, spec, loss, ExportResult) of a float32 distance graph."""
    path = model_dir / "distance.onnx"
    result = export_onnx(DISTANCE_SPEC, path, graph="distance", loss=DISTANCE_LOSS)
    return str(path), DISTANCE_SPEC, DISTANCE_LOSS, result


@pytest.fixture(scope="session")
def style_model(model_dir):
    """(path, spec, loss, ExportResult) of a float32 style graph (cached-target Grams as inputs)."""
    path = model_dir / "style.onnx"
    result = export_onnx(DISTANCE_SPEC, path, graph="style", loss=STYLE_LOSS)
    return str(path), DISTANCE_SPEC, STYLE_LOSS, result


@pytest.fixture(scope="session")
def vgg16_model(model_dir, tv_weights_file):
    """(path, spec, ExportResult): vgg16 from a weights file, input range [-1, 1], avg pooling."""
    spec = FeatureSpec(arch="vgg16", layers=("relu1_2", "conv2_2", "relu3_3"),
                       weights=tv_weights_file("vgg16", ".safetensors"),
                       input_range="-1,1", pooling="avg")
    path = model_dir / "vgg16_avg.onnx"
    result = export_onnx(spec, path)
    return str(path), spec, result


@pytest.fixture(scope="session")
def scaled_weights_file(model_dir):
    """A .safetensors file of seeded random VGG19 weights multiplied by FP16_SCALE."""
    from safetensors.torch import save_file

    base = load_weights(FeatureSpec(arch="vgg19", weights="random", seed=3))
    path = model_dir / "vgg19_scaled.safetensors"
    save_file({k: (v * FP16_SCALE).contiguous() for k, v in base.state.items()}, str(path))
    return str(path)


@pytest.fixture(scope="session")
def fp16_models(model_dir, scaled_weights_file):
    """float16 models with large activations: VGG19 to relu4_4 as features and
    distance ("chw") graphs, and a shallow distance graph with raw ("none") Grams.

    {"spec", "loss", "features": (path, result), "distance": (path, result),
     "raw_spec", "raw_loss", "raw": (path, result)}.
    """
    spec = FeatureSpec(arch="vgg19", weights=scaled_weights_file)
    raw_spec = FeatureSpec(arch="vgg19", layers=FP16_RAW_LAYERS, weights=scaled_weights_file)
    out = {"spec": spec, "loss": FP16_LOSS, "raw_spec": raw_spec, "raw_loss": FP16_RAW_LOSS}
    for key, s, graph, loss in (("features", spec, "features", None),
                                ("distance", spec, "distance", FP16_LOSS),
                                ("raw", raw_spec, "distance", FP16_RAW_LOSS)):
        path = model_dir / f"fp16_{key}.onnx"
        result = export_onnx(s, path, graph=graph, loss=loss, dtype="float16")
        out[key] = (str(path), result)
    return out


# -- LPIPS: the lpips package itself, with a random backbone copied into our format -------------


def _lpips_state(pkg) -> dict[str, torch.Tensor]:
    """The lpips package's VGG16 trunk as a torchvision-format state dict.

    lpips.pretrained_networks.vgg16 keeps torchvision's module indices inside its
    slices ("slice2.5.weight" is features.5.weight), so the names carry over.
    """
    state = {}
    for name, p in pkg.net.named_parameters():
        _, index, kind = name.split(".")
        state[f"features.{index}.{kind}"] = p.detach().clone()
    return state


@pytest.fixture(scope="session")
def lpips_pkg(tmp_path_factory):
    """{"model": lpips.LPIPS(net='vgg', pnet_rand=True) (random trunk, shipped linear
    weights), "weights": its trunk saved as a torchvision-format .pth,
    "scaled": the same with trunk weights x1.7 (activations in the hundreds), and
    "scaled_weights": that trunk's file}. Built once: VGG16's construction is slow."""
    import copy
    import warnings

    lpips = pytest.importorskip("lpips")
    folder = tmp_path_factory.mktemp("lpips")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(16)
        warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for mod in scaled.net.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.mul_(LPIPS_FP16_SCALE)
                mod.bias.mul_(LPIPS_FP16_SCALE)
    out = {"model": model, "scaled": scaled}
    for key, m in (("weights", model), ("scaled_weights", scaled)):
        path = folder / f"{key}.pth"
        torch.save(_lpips_state(m), path)
        out[key] = str(path)
    return out


# Trunk weights x1.7 compound over 13 convolutions: relu5_3 reaches the hundreds, so the
# channel sum of squares (up to 512 x 100²) is far beyond float16's 65504.
LPIPS_FP16_SCALE = 1.7


@pytest.fixture(scope="session")
def lpips_fp32(model_dir, lpips_pkg):
    """(path, spec, result): float32 LPIPS with the spatial map and grad.x, inputs in
    [-1, 1]; one VGG16 export to relu5_3 (a test that needs no float16 model asks for this
    one alone)."""
    from perceptual_engine import lpips as L

    spec = L.default_spec(lpips_pkg["weights"], input_range="-1,1")
    path = model_dir / "lpips_fp32.onnx"
    result = export_onnx(spec, path, graph="lpips", dtype="float32", spatial=True, grad=True)
    return str(path), spec, result


@pytest.fixture(scope="session")
def lpips_models(model_dir, lpips_pkg, lpips_fp32):
    """{"fp32": lpips_fp32; "fp16": (path, spec, result): float16 LPIPS on the scaled trunk,
    inputs in [0, 1]}. Two VGG16 exports to relu5_3: the slow part."""
    from perceptual_engine import lpips as L

    spec = L.default_spec(lpips_pkg["scaled_weights"], input_range="0,1")
    path = model_dir / "lpips_fp16.onnx"
    result = export_onnx(spec, path, graph="lpips", dtype="float16", spatial=False, grad=False)
    return {"fp32": lpips_fp32, "fp16": (str(path), spec, result)}


# A target graph with gradient, exported once into a model cache, shared by the stylize
# tests (API and command line) and the benchmark's stylize-step test: the spec and loss
# are those the benchmark derives for layers relu1_1, relu1_2 (no pooling: the cheapest).
TARGET_GRAD_SPEC = FeatureSpec(layers=("relu1_1", "relu1_2"), weights="random", seed=0)
TARGET_GRAD_LOSS = LossConfig(content={"relu1_2": 1.0}, style={"relu1_1": 1.0, "relu1_2": 1.0})


@pytest.fixture(scope="session")
def target_grad_cache(tmp_path_factory):
    """(cache root for --cache-dir, its models folder, the model's path)."""
    from perceptual_engine.datasets.cache import ensure_model, models_dir

    root = tmp_path_factory.mktemp("target-grad-cache")
    entry = ensure_model(TARGET_GRAD_SPEC, TARGET_GRAD_LOSS, graph="target", grad=True,
                         folder=models_dir(str(root)))
    return str(root), models_dir(str(root)), entry.path


# -- Ray: one local Ray for the session (starting one takes seconds) ---------------------------


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray with 2 CPUs and no dashboard, shared by every Ray test of the session;
    the command line finds it initialized and neither starts nor stops another."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


# -- DISTS: the authors' DISTS_pytorch with a random trunk, and exported DISTS models ----------


def dists_pytorch_model(trunk: torch.nn.Sequential, alpha: torch.Tensor, beta: torch.Tensor):
    """DISTS_pytorch's own ``DISTS`` module on a copy of ``trunk`` (torchvision VGG16
    ``features``) with the given alpha/beta. Its constructor calls torchvision's
    ``vgg16(pretrained=True)`` (a download): that name is patched for the call."""
    import copy
    import types

    dp = pytest.importorskip("DISTS_pytorch.DISTS_pt")
    real = dp.models
    dp.models = types.SimpleNamespace(vgg16=lambda *a, **k: types.SimpleNamespace(features=copy.deepcopy(trunk)))
    try:
        model = dp.DISTS(load_weights=False).eval()
    finally:
        dp.models = real
    with torch.no_grad():
        model.alpha.copy_(alpha)
        model.beta.copy_(beta)
    return model


@pytest.fixture(scope="session")
def dists_pkg(tv_features, tv_weights_file, tmp_path_factory):
    """{"model": DISTS_pytorch.DISTS on the seeded VGG16 trunk with the wheel's alpha/beta,
    "weights": that trunk as a .pth, "w": the wheel's DistsWeights, "alt": DistsWeights of
    seeded random alpha/beta saved at "alt_file", "alt_model": DISTS_pytorch with those}."""
    from perceptual_engine import dists as D

    w = D.load_weights()
    g = torch.Generator().manual_seed(20)
    alt = {"alpha": torch.rand(1, 1475, 1, 1, generator=g), "beta": torch.rand(1, 1475, 1, 1, generator=g)}
    alt_file = tmp_path_factory.mktemp("dists") / "alt.pt"
    torch.save(alt, alt_file)
    trunk = tv_features("vgg16")
    return {"model": dists_pytorch_model(trunk, w.alpha, w.beta), "weights": tv_weights_file("vgg16"),
            "w": w, "alt": D.load_weights(alt_file), "alt_file": str(alt_file),
            "alt_model": dists_pytorch_model(trunk, alt["alpha"], alt["beta"])}


@pytest.fixture(scope="session")
def dists_models(model_dir, dists_pkg):
    """{"fp32": (path, result): float32 DISTS with grad.x and the wheel's alpha/beta, exported
    by the API; "fp16": path: float16 DISTS with the "alt" alpha/beta, exported by the
    command line (export --graph dists --dtype float16 --dists-weights)}. Two VGG16 exports."""
    from perceptual_engine import dists as D
    from perceptual_engine.cli.main import main

    path = model_dir / "dists_fp32.onnx"
    result = export_onnx(D.default_spec(dists_pkg["weights"]), path, graph="dists", grad=True)
    fp16 = model_dir / "dists_fp16.onnx"
    rc = main(["export", "--graph", "dists", "--dtype", "float16", "--weights", dists_pkg["weights"],
               "--dists-weights", dists_pkg["alt_file"], "-o", str(fp16)])
    assert rc == 0
    return {"fp32": (str(path), result), "fp16": str(fp16)}


# One model per VGG graph kind (and gradient), small but behind a max pool (relu2_1), so
# the pool's VJP is in the gradient graphs: shared by the shape and registry tests.
SHAPES_SPEC = FeatureSpec(layers=("relu1_2", "relu2_1"), weights="random", seed=3)
SHAPES_LOSS = LossConfig(content={"relu2_1": 1.0}, style={"relu1_2": 1.0, "relu2_1": 1.0})


@pytest.fixture(scope="session")
def vgg_graphs(tmp_path_factory, features_model, distance_model, style_model):
    """{"features", "distance", "distance-grad", "style", "target-grad"} -> path: the
    session's shared models, plus the two gradient graphs exported here."""
    d = tmp_path_factory.mktemp("vgg_graphs")
    out = {"features": features_model[0], "distance": distance_model[0], "style": style_model[0]}
    for name, graph in (("distance-grad", "distance"), ("target-grad", "target")):
        out[name] = str(d / f"{name}.onnx")
        export_onnx(SHAPES_SPEC, out[name], graph=graph, loss=SHAPES_LOSS, grad=True)
    return out


# -- LPIPS on AlexNet and SqueezeNet 1.1: the lpips package's own nets, random trunks ---------


def lpips_net_state(pkg) -> dict[str, torch.Tensor]:
    """Any lpips net's trunk as a torchvision-format state dict: its slices keep
    torchvision's module indices ("slice2.3.squeeze.weight" is features.3.squeeze.weight)."""
    return {f"features.{name.split('.', 2)[1]}.{name.split('.', 2)[2]}": p.detach().clone()
            for name, p in pkg.net.named_parameters()}


@pytest.fixture(scope="session")
def lpips_trunks(model_dir, tmp_path_factory):
    """{net: {"model": lpips.LPIPS(net=net, pnet_rand=True), "weights": its trunk as a
    torchvision-format .pth, "path": our float32 LPIPS export of it (spatial map, inputs
    in [-1, 1]), "spec": its spec}} for net "alex" and "squeeze": one export each."""
    import warnings

    from perceptual_engine import lpips as L

    lpips = pytest.importorskip("lpips")
    folder = tmp_path_factory.mktemp("lpips_trunks")
    out = {}
    for seed, net in enumerate(("alex", "squeeze"), start=31):
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=
            model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
        weights = folder / f"{net}.pth"
        torch.save(lpips_net_state(model), weights)
        spec = L.default_spec(str(weights), net=net, input_range="-1,1")
        path = model_dir / f"lpips_{net}.onnx"
        export_onnx(spec, path, graph="lpips", spatial=True)
        out[net] = {"model": model, "weights": str(weights), "path": str(path), "spec": spec}
    return out
