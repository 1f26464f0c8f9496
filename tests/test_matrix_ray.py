"""``matrix --ray``: the embedding stage on Ray Data gives the single-machine matrix."""
from __future__ import annotations

import json

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from perceptual_engine.cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_ray_embeddings_equal_local(local_ray, distance_model, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(5)
    root = tmp_path / "set"
    (root / "sub").mkdir(parents=True)
    for k, name in enumerate(("a.png", "sub/b.png", "c.png", "d.png", "e.png")):
        Image.fromarray((rng.uniform(0, 1, (29, 35, 3)) * 255).astype(np.uint8)).save(root / name)
    (root / "bad.png").write_bytes(b"\x89PNG broken")
    outs = {}
    for mode in ("local", "ray"):
        out = tmp_path / f"{mode}.npy"
        argv = ["matrix", str(root), "--model", distance_model[0], "-o", str(out), "--device", "cpu",
                "--batch-size", "2"] + (["--ray"] if mode == "ray" else [])
        assert main(argv) == 1  # bad.png is unreadable: marked, exit 1
        outs[mode] = np.load(out)
        meta = json.loads((tmp_path / f"{mode}.npy.meta.json").read_text())
        assert list(meta["errors"]) == ["bad.png"]
    capsys.readouterr()
    bad = meta["rows"].index("bad.png")
    assert np.isnan(outs["ray"][bad]).all() and np.isnan(outs["ray"][:, bad]).all()
    np.testing.assert_array_equal(outs["ray"], outs["local"])
