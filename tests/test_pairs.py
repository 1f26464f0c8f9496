"""Pairing (files, folders, CSV), the threaded runner and the streamed result files.

The runner is driven by a fake engine here (fast, and it records what it was
given); test_cli.py runs the same code on a real exported model.
"""
from __future__ import annotations

import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from perceptual_engine.errors import ConfigError, ImageError, InputError, NonFiniteError
from perceptual_engine.datasets.pairs import (
    pair_key,
    Pair,
    pair_folders,
    pairs_from_args,
    read_pairs_csv,
    walk_images,
)
from perceptual_engine.datasets.results import ResultFile, StdoutRows
from perceptual_engine.datasets.runner import Progress, run_pairs
from perceptual_engine.spec import FeatureSpec

TERMS = ("content.relu1_2", "total")


def _img(path, h=16, w=16, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


# -- pairing --------------------------------------------------------------------
def test_folders_matched_by_relative_path_with_one_sided_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for rel in ("x.png", "sub/y.jpg", "sub/deeper/z.png", "only_a.png"):
        _img(a / rel)
    for rel in ("x.png", "sub/y.jpg", "sub/deeper/z.png", "sub/only_b.png"):
        _img(b / rel)
    (a / "notes.txt").write_text("not an image")
    _img(a / ".hidden" / "h.png")
    pairs = pair_folders(str(a), str(b))
    rels = [os.path.relpath(p.a, a) for p in pairs]
    assert rels == ["only_a.png", "sub/deeper/z.png", "sub/only_b.png", "sub/y.jpg", "x.png"]
    errors = {os.path.relpath(p.a, a): p.error for p in pairs}
    assert "only in" in errors["only_a.png"] and "no only_a.png in" in errors["only_a.png"]
    assert "only in" in errors["sub/only_b.png"]
    assert not errors["x.png"] and not errors["sub/y.jpg"]
    assert pairs[1].b == os.path.join(str(b), "sub", "deeper", "z.png")


def test_symlink_loop_does_not_hang(tmp_path):
    root = tmp_path / "a"
    _img(root / "x.png")
    _img(root / "sub" / "y.png")
    os.symlink(root, root / "sub" / "loop")  # a -> a/sub/loop -> a ...
    os.symlink(root / "sub", root / "again")  # a second way into sub
    result: list = []
    t = threading.Thread(target=lambda: result.extend(walk_images(str(root))), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "walk_images did not terminate on a symlink loop"
    assert "x.png" in result and len(result) == len(set(result))
    assert sum(r.endswith("y.png") for r in result) == 1  # sub entered once


def test_pairs_from_args(tmp_path):
    f1, f2 = _img(tmp_path / "1.png"), _img(tmp_path / "2.png")
    assert pairs_from_args(f1, f2, None) == [Pair(f1, f2)]
    with pytest.raises(ImageError, match="does not exist"):
        pairs_from_args(f1, str(tmp_path / "missing.png"), None)
    with pytest.raises(ConfigError, match="is a folder but"):
        pairs_from_args(str(tmp_path), f1, None)
    empty1, empty2 = tmp_path / "e1", tmp_path / "e2"
    empty1.mkdir(), empty2.mkdir()
    with pytest.raises(ImageError, match="no image files"):
        pairs_from_args(str(empty1), str(empty2), None)


def test_pairs_csv(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "p.csv").write_text("reference,distorted\n# a comment\n\nx.png, y.png\n/abs/a.png,b.png\n")
    pairs = read_pairs_csv(str(folder / "p.csv"))
    assert pairs == [Pair(str(folder / "x.png"), str(folder / "y.png")),
                     Pair("/abs/a.png", str(folder / "b.png"))]
    (folder / "bad.csv").write_text("a.png,b.png,c.png\n")
    with pytest.raises(ConfigError, match=r"bad.csv:1 has 3 cell"):
        read_pairs_csv(str(folder / "bad.csv"))
    (folder / "none.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="holds no pairs"):
        read_pairs_csv(str(folder / "none.csv"))
    with pytest.raises(ConfigError, match="missing"):
        read_pairs_csv(str(folder / "nope.csv"))


# -- runner ---------------------------------------------------------------------
class FakeEngine:
    """Distance = mean squared difference; records the batches it was given."""

    def __init__(self, spec=None, delay=0.0, fail_on=None):
        self.spec = spec or FeatureSpec(layers=("relu1_2",), weights="random")
        self.output_names = TERMS
        self.max_pixels = 1 << 27
        self.delay, self.fail_on = delay, fail_on
        self.calls: list[tuple[int, ...]] = []
        self.seen_range = [np.inf, -np.inf]
        self.lock = threading.Lock()

    def distance(self, x, y):
        with self.lock:
            self.calls.append(x.shape)
        self.seen_range = [min(self.seen_range[0], x.min()), max(self.seen_range[1], x.max())]
        if self.fail_on is not None and any(np.allclose(xi, self.fail_on) for xi in x):
            raise InputError("x contains a value this fake refuses")
        time.sleep(self.delay)
        d = ((x - y) ** 2).mean(axis=(1, 2, 3)).astype(np.float32)
        return {"content.relu1_2": d, "total": d}


def _run(engine, pairs, **kw):
    rows = []
    stats = run_pairs(engine, pairs, [rows.append], **kw)
    return rows, stats


def test_runner_batches_by_size_and_reports_bad_images(tmp_path):
    pairs = [Pair(_img(tmp_path / f"a{i}.png", seed=i), _img(tmp_path / f"b{i}.png", seed=i + 50))
             for i in range(5)]
    pairs += [Pair(_img(tmp_path / f"c{i}.png", 24, 20, i), _img(tmp_path / f"d{i}.png", 24, 20, i))
              for i in range(3)]
    (tmp_path / "broken.png").write_bytes(b"nope")
    pairs.append(Pair(str(tmp_path / "broken.png"), pairs[0].b))
    pairs.append(Pair("x.png", "y.png", error="only in A: no x.png in B"))
    engine = FakeEngine()
    rows, stats = _run(engine, pairs, batch_size=4, workers=2)
    assert len(rows) == len(pairs) == stats.total
    assert (stats.ok, stats.failed) == (8, 2)
    by_key = {(r["a"], r["b"]): r for r in rows}
    assert "not an image" in by_key[(str(tmp_path / "broken.png"), pairs[0].b)]["error"]
    assert by_key[("x.png", "y.png")]["total"] is None
    assert by_key[(pairs[5].a, pairs[5].b)]["total"] == 0.0  # identical images
    # Pairs of one size are batched together, never mixed; at most batch_size each.
    assert all(n <= 4 for n, *_ in engine.calls)
    assert sorted(n for n, *_ in engine.calls if _[1:] == [16, 16]) == [1, 4]
    assert [c for c in engine.calls if c[2:] == (24, 20)] == [(3, 3, 24, 20)]
    assert 0.0 <= stats.idle_fraction <= 1.0 and "idle" in stats.summary()


def test_runner_isolates_a_failing_pair_in_a_batch(tmp_path):
    ok = [Pair(_img(tmp_path / f"a{i}.png", seed=i), _img(tmp_path / f"b{i}.png", seed=9))
          for i in range(3)]
    flat = np.full((16, 16, 3), 128, np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.png")
    bad = Pair(str(tmp_path / "flat.png"), ok[0].b)
    engine = FakeEngine(fail_on=128 / 255)
    rows, stats = _run(engine, ok + [bad], batch_size=8)
    assert (stats.ok, stats.failed) == (3, 1)
    assert [r["error"] for r in rows if r["a"] == bad.a] == ["x contains a value this fake refuses"]


def test_runner_size_policy_min_size_and_input_range(tmp_path):
    a = _img(tmp_path / "a.png", 20, 20)
    b = _img(tmp_path / "b.png", 16, 24)
    tiny = _img(tmp_path / "tiny.png", 1, 1)
    spec = FeatureSpec(layers=("relu2_2",), weights="random", input_range="-1,1")  # min size 2
    engine = FakeEngine(spec)
    rows, stats = _run(engine, [Pair(a, b), Pair(tiny, tiny)], size_policy="center-crop")
    assert engine.calls == [(1, 3, 16, 20)]
    assert [r["error"][:9] for r in rows if r["a"] == tiny] == ["1x1 is to"]
    assert engine.seen_range[0] < -0.5  # [0, 1] pixels were mapped to the model's [-1, 1]
    rows, _ = _run(FakeEngine(), [Pair(a, b)])
    assert "sizes differ" in rows[0]["error"]


def test_runner_skips_and_engine_not_starved(tmp_path):
    pairs = [Pair(_img(tmp_path / f"a{i}.png", 64, 64, i), _img(tmp_path / f"b{i}.png", 64, 64, i + 9))
             for i in range(16)]
    engine = FakeEngine(delay=0.03)  # an engine slower than decoding two small PNGs
    rows, stats = _run(engine, pairs, batch_size=2, workers=2, skip={pairs[0].key, pairs[1].key})
    assert stats.skipped == 2 and len(rows) == 14 and {r["a"] for r in rows}.isdisjoint(
        {pairs[0].a, pairs[1].a})
    # Decoding runs ahead on threads, so the engine thread barely waits.
    assert stats.wait_s < 0.5 * stats.engine_s, stats.summary()
    assert stats.idle_fraction < 0.5


def test_progress_bar_draws_only_when_enabled():
    buf = io.StringIO()
    bar = Progress(4, buf, enabled=True)
    for _ in range(4):
        bar.advance()
    bar.message("a line")
    bar.close()
    text = buf.getvalue()
    assert "4/4 pairs" in text and "pairs/s" in text and "ETA" in text and "a line\n" in text
    quiet = io.StringIO()
    bar = Progress(4, quiet, enabled=False)
    bar.advance()
    bar.message("a line")
    bar.close()
    assert quiet.getvalue() == "a line\n"


# -- result files -----------------------------------------------------------------
def _row(a, total, error=""):
    return {"a": a, "b": a + "'", "content.relu1_2": total, "total": total, "error": error}


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_result_file_resume_keeps_successes_only(tmp_path, ext):
    path = str(tmp_path / f"r{ext}")
    f = ResultFile(path, TERMS)
    f.write(_row("1", 0.5))
    f.write(_row("2", None, "broken"))
    f.write(_row("3", 0.25))
    f.close()
    with open(path, "a") as fh:
        fh.write('4,4\',0.1' if ext == ".csv" else '{"a": "4", "b"')  # killed mid-row
    f = ResultFile(path, TERMS, resume=True)
    assert f.done == {pair_key("1", "1'"), pair_key("3", "3'")}
    f.write(_row("2", 0.75))
    f.close()
    text = open(path).read()
    if ext == ".csv":
        lines = text.splitlines()
        assert lines[0] == "a,b,content.relu1_2,total,error"
        assert [ln.split(",")[0] for ln in lines[1:]] == ["1", "3", "2"]
    else:
        rows = [json.loads(ln) for ln in text.splitlines()]
        assert [r["a"] for r in rows] == ["1", "3", "2"] and rows[0]["error"] is None
        assert rows[2]["total"] == 0.75


def test_result_file_refuses_other_columns_and_extensions(tmp_path):
    path = str(tmp_path / "r.csv")
    ResultFile(path, ("style.relu1_2", "total")).close()
    with pytest.raises(ConfigError, match="another model"):
        ResultFile(path, TERMS, resume=True)
    with pytest.raises(ConfigError, match="extension"):
        ResultFile(str(tmp_path / "r.xlsx"), TERMS)
    fresh = ResultFile(path, TERMS)  # without --resume the file is started over
    fresh.close()
    assert open(path).read() == "a,b,content.relu1_2,total,error\n"


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_stdout_rows(fmt):
    buf = io.StringIO()
    out = StdoutRows(buf, fmt, TERMS, path_width=4)
    out.write(_row("1", 0.5))
    out.write(_row("2", None, "broken"))
    out.close()
    text = buf.getvalue()
    if fmt == "json":
        rows = json.loads(text)
        assert rows[0]["total"] == 0.5 and rows[1]["error"] == "broken" and rows[1]["total"] is None
    elif fmt == "csv":
        assert text.splitlines() == ["a,b,content.relu1_2,total,error", "1,1',0.5,0.5,",
                                     "2,2',,,broken"]
    else:
        lines = text.splitlines()
        assert lines[0].split() == ["a", "b", "content.relu1_2", "total", "error"]
        assert lines[1].split() == ["1", "1'", "0.5", "0.5"]
        assert lines[2].split() == ["2", "2'", "-", "-", "broken"]
    empty = io.StringIO()
    StdoutRows(empty, "json", TERMS).close()
    assert json.loads(empty.getvalue()) == []


def test_fake_engine_matches_the_engine_interface():
    # The runner only uses these attributes of Engine; keep the fake honest.
    from perceptual_engine.runtime import Engine

    for name in ("spec", "output_names", "max_pixels", "distance"):
        assert hasattr(Engine, name) or name in Engine.__init__.__code__.co_names


class OverflowingEngine(FakeEngine):
    """Sample 1 of every batch overflows, as a float16 model can."""

    def distance(self, x, y):
        out = super().distance(x, y)
        if len(x) > 1:
            out = {k: v.copy() for k, v in out.items()}
            out["total"][1] = np.inf
            raise NonFiniteError("the distance of sample(s) [1] is not finite", out, [1])
        return out


def test_runner_keeps_the_finite_samples_of_an_overflowing_batch(tmp_path):
    pairs = [Pair(_img(tmp_path / f"a{i}.png", seed=i), _img(tmp_path / f"b{i}.png", seed=i + 9))
             for i in range(3)]
    engine = OverflowingEngine()
    rows, stats = _run(engine, pairs, batch_size=3, workers=1)
    assert [c[0] for c in engine.calls] == [3]  # one call: nothing recomputed
    assert (stats.ok, stats.failed) == (2, 1)
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and "not finite" in bad[0]["error"] and bad[0]["total"] is None
    assert all(r["total"] > 0 for r in rows if not r["error"])
