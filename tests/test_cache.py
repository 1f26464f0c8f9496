"""The model cache: built once, reused, rebuilt when corrupt, serialized by a lock."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest

from perceptual_engine.datasets import cache
from perceptual_engine._io import atomic_path
from perceptual_engine.errors import ModelError
from perceptual_engine.export import ExportResult
from perceptual_engine.spec import FeatureSpec, LossConfig

SPEC = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random")
LOSS = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real export into a cache folder (once for the module), and a pristine copy."""
    folder = str(tmp_path_factory.mktemp("cache"))
    entry = cache.ensure_model(SPEC, LOSS, folder=folder)
    pristine = os.path.join(str(tmp_path_factory.mktemp("pristine")), "model.onnx")
    shutil.copyfile(entry.path, pristine)
    return entry, pristine


@pytest.fixture
def folder(built, tmp_path):
    """A fresh cache folder holding a copy of the built entry."""
    entry, _ = built
    for suffix in (".onnx", ".json"):
        shutil.copyfile(os.path.splitext(entry.path)[0] + suffix,
                        str(tmp_path / (entry.key + suffix)))
    return str(tmp_path)


class CountingExport:
    """Stands in for export_onnx: copies the pristine model (slowly, if asked)."""

    def __init__(self, pristine: str, delay: float = 0.0) -> None:
        self.pristine, self.delay, self.calls = pristine, delay, 0
        self.lock = threading.Lock()

    def __call__(self, spec, path, **kw):
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        with atomic_path(path) as tmp:
            shutil.copyfile(self.pristine, tmp)
        return ExportResult(path=path, graph="distance", dtype="float32", inputs=("x", "y"),
                            outputs=LOSS.output_names(), weights_sha256="0" * 64)


def test_first_build_is_real_and_recorded(built):
    entry, _ = built
    assert entry.built and os.path.isfile(entry.path) and entry.key in entry.path
    record = json.load(open(os.path.splitext(entry.path)[0] + ".json"))
    assert record["key"] == entry.key == cache.model_key(SPEC, LOSS)
    assert record["sha256"] and set(record["errors"]) == set(LOSS.output_names())
    assert all(e["max_rel"] < 1e-4 for e in record["errors"].values())


def test_intact_entry_is_reused_without_export(folder, built, monkeypatch):
    fake = CountingExport(built[1])
    monkeypatch.setattr(cache, "export_onnx", fake)
    entry = cache.ensure_model(SPEC, LOSS, folder=folder)
    assert not entry.built and fake.calls == 0
    assert entry.errors == built[0].errors


@pytest.mark.parametrize("damage", ["flip-bytes", "truncate", "no-sidecar", "bad-sidecar",
                                    "other-key"])
def test_damaged_entry_is_rebuilt(folder, built, monkeypatch, damage):
    fake = CountingExport(built[1])
    monkeypatch.setattr(cache, "export_onnx", fake)
    key = cache.model_key(SPEC, LOSS)
    model, sidecar = os.path.join(folder, key + ".onnx"), os.path.join(folder, key + ".json")
    if damage == "flip-bytes":
        data = bytearray(open(model, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(model, "wb").write(bytes(data))
    elif damage == "truncate":
        os.truncate(model, 1000)
    elif damage == "no-sidecar":
        os.unlink(sidecar)
    elif damage == "bad-sidecar":
        open(sidecar, "w").write("{not json")
    else:
        record = json.load(open(sidecar))
        record["key"] = "0" * 16
        json.dump(record, open(sidecar, "w"))
    record, why = cache.check_entry(model, key, SPEC, LOSS, "float32")
    assert record is None and why
    said: list[str] = []
    entry = cache.ensure_model(SPEC, LOSS, folder=folder, say=said.append)
    assert entry.built and fake.calls == 1
    assert why in said[0]
    assert cache.check_entry(model, key, SPEC, LOSS, "float32")[0] is not None
    assert not cache.ensure_model(SPEC, LOSS, folder=folder).built and fake.calls == 1


def test_entry_whose_sidecar_matches_but_metadata_differs_is_rebuilt(folder, built, monkeypatch):
    other = LossConfig(content={"relu2_2": 2.0})
    key = cache.model_key(SPEC, other)
    for suffix in (".onnx", ".json"):
        os.replace(os.path.join(folder, cache.model_key(SPEC, LOSS) + suffix),
                   os.path.join(folder, key + suffix))
    sidecar = os.path.join(folder, key + ".json")
    record = json.load(open(sidecar))
    record["key"] = key
    json.dump(record, open(sidecar, "w"))
    assert "metadata differs" in cache.check_entry(os.path.join(folder, key + ".onnx"), key,
                                                   SPEC, other, "float32")[1]


def test_key_depends_on_everything_that_changes_the_numbers(tmp_path):
    base = cache.model_key(SPEC, LOSS)
    assert base == cache.model_key(FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random"),
                                   LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0}))
    others = [
        cache.model_key(SPEC, LOSS, "float16"),
        cache.model_key(FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random", seed=1), LOSS),
        cache.model_key(SPEC, LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0}, gram="hw")),
        cache.model_key(SPEC, LossConfig(content={"relu2_2": 0.5}, style={"relu1_2": 1.0})),
        cache.model_key(SPEC, LossConfig(content={"relu2_2": 1.0, "relu1_2": 1.0})),
        cache.model_key(SPEC, LossConfig(content={"relu1_2": 1.0, "relu2_2": 1.0})),  # order
        cache.model_key(SPEC, LOSS, static_shape=(8, 224, 224)),
        cache.model_key(SPEC, LOSS, static_shape=(8, 224, 256)),
    ]
    assert len({base, *others}) == len(others) + 1
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    spec = FeatureSpec(layers=("relu1_2",), weights=str(weights))
    loss = LossConfig(content={"relu1_2": 1.0})
    before = cache.model_key(spec, loss)
    os.utime(weights, ns=(1, 1))
    assert cache.model_key(spec, loss) != before  # a replaced weights file is re-exported


def test_static_shape_entries_are_their_own(built):
    """A static-shape request does not reuse the dynamic entry: its own key, and an entry
    whose static shape differs is not intact for it."""
    entry, _ = built
    assert cache.check_entry(entry.path, entry.key, SPEC, LOSS, "float32")[0] is not None
    key = cache.model_key(SPEC, LOSS, static_shape=(2, 33, 35))
    record, why = cache.check_entry(entry.path, key, SPEC, LOSS, "float32", static_shape=(2, 33, 35))
    assert record is None and why == "sidecar is for another model"
    record, why = cache.check_entry(entry.path, entry.key, SPEC, LOSS, "float32", static_shape=(2, 33, 35))
    assert record is None and "static shape" in why


def test_concurrent_builders_export_once(tmp_path, built, monkeypatch):
    fake = CountingExport(built[1], delay=0.3)
    monkeypatch.setattr(cache, "export_onnx", fake)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        cache.ensure_model(SPEC, LOSS, folder=str(tmp_path)))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert fake.calls == 1 and len(results) == 3
    assert sum(r.built for r in results) == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".tmp", ".lock"))]  # nothing left


def test_open_engine_rebuilds_an_entry_that_fails_to_load(folder, built, monkeypatch):
    import perceptual_engine.runtime as runtime

    fake = CountingExport(built[1])
    monkeypatch.setattr(cache, "export_onnx", fake)
    real = runtime.Engine
    attempts: list[str] = []

    def flaky(path, device="auto", **kw):
        attempts.append(path)
        if len(attempts) == 1:
            raise ModelError("ONNX Runtime could not load it")
        return real(path, device, **kw)

    monkeypatch.setattr(runtime, "Engine", flaky)
    engine, entry = cache.open_engine(SPEC, LOSS, device="cpu", folder=folder)
    assert len(attempts) == 2 and entry.built and fake.calls == 1
    assert engine.output_names == LOSS.output_names()


def test_default_folder_follows_the_cache_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEPTUAL_ENGINE_CACHE", str(tmp_path))
    assert cache.models_dir() == os.path.join(str(tmp_path), "models")
    assert cache.models_dir("/elsewhere") == os.path.join("/elsewhere", "models")


def _rewrite_keeping_size_and_mtime(path, data: bytes) -> None:
    """Write ``data`` over ``path`` in place (same inode, same size) and set its mtime back."""
    st = os.stat(path)
    assert len(data) == st.st_size
    time.sleep(0.05)  # past the clock tick of the ctime the first write got
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_weights_rewritten_in_place_with_mtime_restored_are_re_exported(tmp_path):
    """A checkpoint rewritten with the same size and its mtime set back: the cache must not
    reuse the model of the old weights (ctime is in the key)."""
    import numpy as np
    import torch

    from perceptual_engine import Engine

    weights = tmp_path / "w.pth"
    g = torch.Generator().manual_seed(5)
    state = {"features.0.weight": torch.randn(64, 3, 3, 3, generator=g) * 0.2,
             "features.0.bias": torch.randn(64, generator=g) * 0.1}
    torch.save(state, weights)
    spec, loss = FeatureSpec(layers=("relu1_1",), weights=str(weights)), LossConfig(content={"relu1_1": 1.0})
    x, y = (np.random.default_rng(s).uniform(0, 1, (1, 3, 24, 24)).astype(np.float32) for s in (1, 2))
    first = cache.ensure_model(spec, loss, folder=str(tmp_path / "models"))
    before = Engine(first.path, "cpu").distance(x, y)["total"]
    (tmp_path / "b").mkdir()
    other = tmp_path / "b" / "w.pth"  # same name: torch.save's archive names the file
    torch.save({k: v * 2 for k, v in state.items()}, other)
    _rewrite_keeping_size_and_mtime(weights, other.read_bytes())
    second = cache.ensure_model(spec, loss, folder=str(tmp_path / "models"))
    assert second.built and second.path != first.path
    after = Engine(second.path, "cpu").distance(x, y)["total"]
    assert not np.allclose(after, before, rtol=1e-3)
