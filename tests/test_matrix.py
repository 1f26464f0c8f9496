"""Engine.matrix: every entry against the engine's own pairwise distance, near-duplicates,
symmetry, blocks, the spill store and the memory budget (docs/matrix.md)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from perceptual_engine.errors import InputError, MemoryBudgetError, ModelError
from perceptual_engine.runtime import Engine
from perceptual_engine.runtime import matrix as M

H, W = 37, 45  # odd, and not a multiple of any downsampling


@pytest.fixture(scope="module")
def dist_engine(distance_model):
    return Engine(distance_model[0], "cpu")


@pytest.fixture(scope="module")
def lpips_engine(lpips_models):
    # The float32 LPIPS fixture has the spatial map and grad.x: its x branch is cut
    # from a graph where x and y run separately (not as one concatenated batch).
    return Engine(lpips_models["fp32"][0], "cpu")


def _images(n, seed, lo=0.0, hi=1.0):
    rng = np.random.default_rng(seed)
    return rng.uniform(lo, hi, size=(n, 3, H, W)).astype(np.float32)


def _pairwise(engine, x, y):
    """The engine's own distance for every (i, j): {term: (n, m)}."""
    i, j = np.meshgrid(np.arange(len(x)), np.arange(len(y)), indexing="ij")
    d = engine.distance(np.ascontiguousarray(x[i.ravel()]), np.ascontiguousarray(y[j.ravel()]))
    return {k: v.reshape(len(x), len(y)) for k, v in d.items() if v.ndim == 1}  # not spatial, grad.x


def _rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert (np.abs(ref) > 0).all(), "a zero reference entry proves nothing relative"
    return float(np.max(np.abs(got - ref) / np.abs(ref)))


def test_distance_matrix_equals_pairwise(dist_engine):
    x = _images(5, 0)
    y = _images(3, 1)
    stats = {}
    got = dist_engine.matrix(x, y, stats=stats)
    ref = _pairwise(dist_engine, x, y)
    assert set(got) == set(ref) == set(dist_engine.info.term_names)
    for k in ref:
        assert got[k].shape == (5, 3) and got[k].dtype == np.float32
        assert _rel(got[k], ref[k]) < 1e-4, k


def test_self_matrix_symmetric_exact_zero_diagonal(dist_engine):
    x = _images(6, 2)
    got = dist_engine.matrix(x)
    ref = _pairwise(dist_engine, x, x)
    off = ~np.eye(6, dtype=bool)
    for k, v in got.items():
        assert np.array_equal(v, v.T), k
        assert (np.diag(v) == 0).all(), k
        assert _rel(v[off], ref[k][off]) < 1e-4, k


def test_lpips_matrix_and_near_duplicates(lpips_engine):
    x = _images(5, 3, -1.0, 1.0)  # the fixture's input range is [-1, 1]
    # Near-duplicates: tiny perturbations of x[0], LPIPS around 1e-4 and below.
    rng = np.random.default_rng(4)
    x[1] = np.clip(x[0] + rng.normal(0, 2e-3, x[0].shape), -1, 1)
    x[2] = np.clip(x[0] + rng.normal(0, 5e-4, x[0].shape), -1, 1)
    stats = {}
    got = lpips_engine.matrix(x, stats=stats)
    ref = _pairwise(lpips_engine, x, x)
    assert stats["recomputed"] > 0  # the near entries took the difference path
    for k, v in got.items():
        assert np.max(np.abs(v - ref[k])) < 1e-5, k
        assert np.array_equal(v, v.T) and (np.diag(v) == 0).all()
    near = [ref["total"][0, 1], ref["total"][0, 2], ref["total"][1, 2]]
    assert max(near) < 1e-3 and min(near) > 0, near
    # Far below the 1e-5 bound: relative to the entry itself.
    assert _rel([got["total"][0, 1], got["total"][0, 2], got["total"][1, 2]], near) < 1e-3


def test_lpips_float16_network(lpips_models):
    engine = Engine(lpips_models["fp16"][0], "cpu")  # float16 taps, head in float32
    x = _images(3, 5)
    got = engine.matrix(x, x[:2])
    ref = _pairwise(engine, x, x[:2])
    assert np.max(np.abs(got["total"] - ref["total"])) < 1e-5


def test_blocked_equals_unblocked_and_spill(dist_engine, tmp_path):
    x = _images(7, 6)
    whole = dist_engine.matrix(x)
    blocked = dist_engine.matrix(x, block=2)  # 4x4 blocks, diagonal and mirrored ones
    spilled = dist_engine.matrix(x, block=3, spill=True, spill_dir=str(tmp_path))
    for k in whole:
        np.testing.assert_allclose(blocked[k], whole[k], rtol=1e-5, atol=0)
        np.testing.assert_allclose(spilled[k], whole[k], rtol=1e-5, atol=0)
        assert np.array_equal(blocked[k], blocked[k].T)
    assert os.listdir(tmp_path) == []  # the spill folder is removed


def test_spill_store_is_memory_mapped(tmp_path):
    from perceptual_engine.runtime.embstore import EmbeddingStore

    rng = np.random.default_rng(0)
    rows = {"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=(4, 3)).astype(np.float32)}
    with EmbeddingStore(4, {"a": 5, "b": 3}, spill=True, spill_dir=str(tmp_path)) as store:
        assert isinstance(store._data["a"], np.memmap) and store.folder.startswith(str(tmp_path))
        store.put(slice(0, 4), rows)
        assert np.array_equal(store.block("a", slice(1, 3)), rows["a"][1:3])
        np.testing.assert_allclose(store.norms["b"], (rows["b"].astype(np.float64) ** 2).sum(1))
        folder = store.folder
    assert not os.path.exists(folder)


def test_float16_store_error(dist_engine):
    x = _images(5, 7)
    ref = dist_engine.matrix(x)
    half = dist_engine.matrix(x, store_dtype="float16")
    off = ~np.eye(5, dtype=bool)
    # float16 embeddings (11-bit mantissa): measured ~1e-3 relative here; documented.
    assert _rel(half["total"][off], ref["total"][off]) < 1e-2
    assert (np.diag(half["total"]) == 0).all()


def test_budget_too_small_names_the_figure(distance_model):
    engine = Engine(distance_model[0], "cpu", memory_budget="1K")
    with pytest.raises(MemoryBudgetError, match=r"needs at least .*over the memory budget of 1.0 KiB"):
        engine.matrix(_images(3, 8))


def test_small_budget_spills_and_stays_exact(distance_model):
    x = _images(6, 9)
    free = Engine(distance_model[0], "cpu", memory_budget=0).matrix(x)
    engine = Engine(distance_model[0], "cpu")
    emb = M.Embedder.of(engine)
    need = M.plan(engine, emb, 6, 0, H, W)  # no budget consulted below 256 MiB: in memory
    assert not need.spill
    # Room for the results, one image's forward and half of the embeddings.
    engine.memory_budget = need.smallest + need.embeddings // 2
    p = M.plan(engine, emb, 6, 0, H, W)
    assert p.spill and p.limit == engine.memory_limit()
    got = engine.matrix(x)
    for k in free:
        np.testing.assert_allclose(got[k], free[k], rtol=1e-5, atol=0)


def test_bad_inputs(dist_engine, style_model):
    with pytest.raises(InputError, match="37x45 images and y 37x41"):
        dist_engine.matrix(_images(2, 0), _images(2, 1)[..., :41])
    with pytest.raises(InputError, match="outside the model's input range"):
        dist_engine.matrix(_images(2, 0, 0.0, 2.0))
    with pytest.raises(InputError, match=r"N >= 1"):
        dist_engine.matrix(np.zeros((0, 3, H, W), np.float32))
    with pytest.raises(ModelError, match="style graph"):
        Engine(style_model[0], "cpu").matrix(_images(2, 0))
    one = dist_engine.matrix(_images(1, 0))  # one image: a 1x1 matrix
    assert one["total"].shape == (1, 1) and one["total"][0, 0] == 0
