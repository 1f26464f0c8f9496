"""``distance`` on its two paths (one process, ``--ray``): the same flags, the same rows.

cli/distance_flags.FLAGS says how each path treats every option of the ``distance``
subparser: honoured, or refused with a one-line reason. Here:

- every option of the subparser (from build_parser()) has a row, so a new flag
  cannot be dropped silently by one path;
- every refused (flag, path) is refused with exit 2, one line, before any work;
- four scenarios (LPIPS, DISTS, spec flags, a given model) run the honoured flags through both paths (the session's local
  Ray, small images of odd sizes, seeded random weights, shallow specs) and compare
  the result files, the rows on stdout and the LPIPS maps; a test checks that the
  scenarios exercise every honoured flag on both paths.

Tolerance: values from one model on one provider (CPU) in batches of different
composition: relative 1e-5 (float16 network in one scenario); maps: 1 grey level.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch

from perceptual_engine.cli.distance_flags import FLAGS, HONOURED, RAY, SINGLE
from perceptual_engine.cli.main import build_parser, main

REL = 1e-5


@functools.lru_cache(maxsize=1)
def _distance_parser():
    return build_parser().subcommands["distance"]  # type: ignore[attr-defined]


def _dest(option: str) -> str:
    for action in _distance_parser()._actions:
        if option in action.option_strings:
            return action.dest
    raise KeyError(option)


# -- the table ----------------------------------------------------------------------------

def test_every_distance_option_has_a_row_for_both_paths():
    dests = {a.dest for a in _distance_parser()._actions if a.dest != "help"}
    assert dests == set(FLAGS), (f"not in FLAGS: {sorted(dests - set(FLAGS))}; "
                                 f"in FLAGS but no option: {sorted(set(FLAGS) - dests)}")
    for dest, how in FLAGS.items():
        assert set(how) == {SINGLE, RAY}, dest
        for path, treatment in how.items():
            if treatment != HONOURED:  # a reason: one line that names the flag
                flag = "--" + dest.replace("_", "-")
                assert flag in treatment and "\n" not in treatment, (dest, path)


# A value for each flag a path refuses: a new refused flag needs one here.
REFUSED_SAMPLES = {"workers": ["--workers", "2"], "ray_address": ["--ray-address", "127.0.0.1:1"],
                   "ray_actors": ["--ray-actors", "2"]}


def _refused():
    return [(dest, path) for dest, how in FLAGS.items() for path, t in how.items() if t != HONOURED]


@pytest.mark.parametrize("dest,path", _refused())
def test_each_refused_flag_is_refused_in_one_line_before_any_work(dest, path, tmp_path, capsys,
                                                                   distance_model):
    assert dest in REFUSED_SAMPLES, f"give a sample value of --{dest} in REFUSED_SAMPLES"
    cache = tmp_path / "cache"
    argv = ["distance", "a.png", "b.png", "--model", distance_model[0], "--cache-dir", str(cache),
            "--output", str(tmp_path / "rows.csv"), *REFUSED_SAMPLES[dest]]
    code = main(argv + (["--ray"] if path == RAY else []))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and FLAGS[dest][path] in err, err
    assert not (tmp_path / "rows.csv").exists() and not cache.exists()


# -- both paths, same rows ----------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Folders a/ and b/ of 5 pairs (odd sizes, one pair of two sizes, one file on one
    side only), a big image, one over --max-pixels, and a pairs CSV over all of them."""
    from PIL import Image

    root = tmp_path_factory.mktemp("paths")
    rng = np.random.default_rng(21)
    a, b = root / "a", root / "b"
    a.mkdir(), b.mkdir()

    def save(path, h, w):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        return str(path)

    for i, (h, w) in enumerate([(37, 45), (41, 33), (37, 45), (33, 39)]):
        save(a / f"p{i}.png", h, w)
        save(b / f"p{i}.png", h, w)
    save(a / "sizes.png", 37, 45)
    save(b / "sizes.png", 39, 41)  # an error row, or resized with --size-policy resize
    save(a / "only_a.png", 37, 45)
    big_a, big_b = save(root / "big_a.png", 90, 71), save(root / "big_b.png", 90, 71)
    huge_a, huge_b = save(root / "huge_a.png", 120, 130), save(root / "huge_b.png", 120, 130)
    pairs = root / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        w = csv.writer(fh)
        for name in ("p0", "p1", "p2", "p3", "sizes"):
            w.writerow([str(a / f"{name}.png"), str(b / f"{name}.png")])
        w.writerow([big_a, big_b])  # downscaled by --max-side
        w.writerow([huge_a, huge_b])  # over --max-pixels: an error row
        w.writerow([str(a / "p0.png"), str(root / "missing.png")])
    return {"a": str(a), "b": str(b), "pairs": str(pairs), "root": root}


@pytest.fixture(scope="module")
def lin_weights(tmp_path_factory):
    """LPIPS linear weights other than the lpips package's: seeded, non-negative."""
    from perceptual_engine.lpips.core import _keys

    g = torch.Generator().manual_seed(9)
    path = tmp_path_factory.mktemp("lin") / "lin.pth"
    torch.save({k: torch.rand(s, generator=g) for k, s in _keys().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("paths-cache"))


def _scenarios(images, lin_weights, cache, distance_model, budget, dists_file=None):
    """name -> (argv without --output/--spatial-dir/--ray, output extension, maps?)."""
    return {
        # DISTS from the flags, with alpha/beta from a file.
        "dists": ([images["a"], images["b"], "--graph", "dists", "--weights", "random",
                   "--seed", "6", "--dists-weights", str(dists_file), "--cache-dir", cache,
                   "--format", "json"], ".jsonl", False),
        # LPIPS from the flags: the Ray path used to drop --graph lpips, --lpips-weights
        # and --spatial-dir and compute VGG19 content terms instead.
        "lpips": ([images["a"], images["b"], "--graph", "lpips", "--weights", "random",
                   "--seed", "4", "--input-range=-1,1", "--lpips-weights", lin_weights,
                   "--arch", "vgg16", "--lpips-net", "vgg", "--cache-dir", cache, "--format", "json"],
                  ".jsonl", True),
        # A distance model from the spec flags, every spec flag away from its default.
        "spec": (["--pairs", images["pairs"], "--arch", "vgg16", "--layers",
                  "relu1_1,relu1_2,relu2_1", "--weights", "random", "--seed", "5", "--pooling",
                  "avg", "--content", "relu2_1=1", "--style", "relu1_1=1,relu1_2=2", "--gram", "hw",
                  "--dtype", "float16", "--cache-dir", cache, "--size-policy", "resize",
                  "--max-side", "48", "--max-pixels", "10000", "--batch-size", "3",
                  "--device", "cpu", "--precision", "f32", "--format", "csv"], ".csv", False),
        # A given model, a memory budget that refuses the largest pair, resumed output.
        "model": ([images["a"], images["b"], "--model", distance_model[0], "--memory-budget",
                   budget, "--batch-size", "2", "--graph", "distance", "--format", "json"],
                  ".jsonl", False),
    }


def test_the_scenarios_cover_every_comparing_kind():
    """Every kind that ``distance`` computes (kinds.py) runs through both paths: a new
    kind needs its scenario above."""
    from perceptual_engine import kinds

    argvs = _scenarios(defaultdict(str), "", "", ("",), "").values()
    graphs = {argv[argv.index("--graph") + 1] if "--graph" in argv else "distance" for argv, _, _ in argvs}
    assert set(kinds.names(compares=True)) <= graphs


def _budget(distance_model) -> str:
    """A --memory-budget between the estimates of a 37x45 pair and a 41x33... pair pair:
    the 37x45 pairs (the largest) are refused as error rows, the others computed."""
    from perceptual_engine.runtime import Engine

    engine = Engine(distance_model[0], "cpu")
    big = engine.estimate_memory(1, 37, 45).total
    small = engine.estimate_memory(1, 41, 33).total
    assert small < big
    return str((small + big) // 2 // 1024) + "K"


def _stdout_rows(text: str, fmt: str) -> list[dict]:
    if fmt == "json":
        rows = json.loads(text)
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        for r in rows:
            for k, v in r.items():
                if k not in ("a", "b", "error"):
                    r[k] = float(v) if v else None
    for r in rows:
        r["error"] = r["error"] or ""
    return rows


def _file_rows(path: str) -> list[dict]:
    if path.endswith(".csv"):
        with open(path, newline="") as fh:
            return _stdout_rows(fh.read(), "csv")
    with open(path) as fh:
        return _stdout_rows("[" + ",".join(line for line in fh if line.strip()) + "]", "json")


def _keyed(rows):
    keys = [(r["a"], r["b"]) for r in rows]
    assert len(keys) == len(set(keys)), "a pair appears twice"
    return dict(zip(keys, rows))


def _same(got: list[dict], want: list[dict]) -> None:
    g, w = _keyed(got), _keyed(want)
    assert set(g) == set(w)
    for key, row in w.items():
        assert list(g[key]) == list(row), key
        assert g[key]["error"] == row["error"], key
        for col in list(row)[2:-1]:
            if row[col] is None:
                assert g[key][col] is None, (key, col)
            else:
                assert g[key][col] == pytest.approx(row[col], rel=REL), (key, col)


def _run(argv, capsys):
    code = main(["distance", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _partial(full: str, dest: str, keep: int) -> str:
    """What an interrupted run leaves (JSON lines): ``keep`` computed rows, a failed one,
    and the record beside them."""
    with open(full) as fh:
        lines = [line for line in fh if line.strip()]
    ok = [line for line in lines if json.loads(line)["error"] is None]
    failed = [line for line in lines if json.loads(line)["error"] is not None]
    with open(dest, "w") as fh:
        fh.writelines(ok[:keep] + failed[:1])
    shutil.copyfile(full + ".meta.json", dest + ".meta.json")
    return dest


COVERED: dict[str, set[str]] = {SINGLE: set(), RAY: set()}


@pytest.mark.parametrize("name", ["lpips", "dists", "spec", "model"])
def test_both_paths_give_the_same_rows(name, local_ray, images, lin_weights, cache,
                                       distance_model, tmp_path, capsys, request):
    dists_file = request.getfixturevalue("dists_pkg")["alt_file"] if name == "dists" else None
    argv, ext, maps = _scenarios(images, lin_weights, cache, distance_model,
                                 _budget(distance_model), dists_file)[name]
    fmt = argv[argv.index("--format") + 1]
    results = {}
    full = None
    if name == "model":  # --resume: both paths continue the same partial file
        full = str(tmp_path / f"full{ext}")
        assert _run(argv + ["--output", full], capsys)[0] == 1
    for path in (SINGLE, RAY):
        out = str(tmp_path / f"{path}{ext}")
        extra = ["--output", out]
        if maps:
            extra += ["--spatial-dir", str(tmp_path / f"maps-{path}")]
        if full:
            extra += ["--resume"]
            _partial(full, out, keep=2)
        if path == RAY:
            extra += ["--ray", "--ray-actors", "1",
                      "--ray-address", local_ray.get_runtime_context().gcs_address]
        else:
            extra += ["--workers", "2"]
        code, stdout, err = _run(argv + extra, capsys)
        assert "Traceback" not in err, err
        results[path] = (code, _file_rows(out), _stdout_rows(stdout, fmt), err)
        COVERED[path] |= {_dest(a.split("=")[0]) for a in argv + extra if a.startswith("--")}
        COVERED[path] |= {"a", "b"} if not argv[0].startswith("--") else set()
    (c1, file1, screen1, err1), (c2, file2, screen2, err2) = results[SINGLE], results[RAY]
    assert c1 == c2, (err1, err2)
    _same(file2, file1)
    _same(screen2, screen1)
    assert any(r["error"] for r in file1) and any(not r["error"] for r in file1)
    if name == "lpips":  # LPIPS columns, not VGG19 content terms
        assert [c for c in file1[0] if c.startswith("lpips.")] and "content.relu2_2" not in file1[0]
        # The exported LPIPS model, given with --model, is accepted by the Ray job too
        # (it used to be refused, with a hint to export --graph distance).
        from perceptual_engine.distributed.job import resolve_model
        from perceptual_engine.runtime import read_info

        models = os.path.join(cache, "models")
        lp = [os.path.join(models, f) for f in os.listdir(models) if f.endswith(".onnx")
              and read_info(os.path.join(models, f)).graph == "lpips"]
        assert lp and resolve_model(lp[0], None, None) == os.path.abspath(lp[0])
    if name == "spec":  # the errors the flags cause: --max-pixels refuses, --max-side resizes
        errors = {os.path.basename(r["a"]): r["error"] for r in file1}
        assert "pixels" in errors["huge_a.png"] and not errors["big_a.png"]
        assert not errors["sizes.png"]  # --size-policy resize
    if name == "model":
        assert any("memory budget" in r["error"] for r in file1)
        assert len(screen1) == len(file1) - 2  # the kept rows were not recomputed
        assert "2 skipped" in err1 and "2 skipped" in err2
    if maps:
        from PIL import Image

        m1, m2 = (sorted(os.listdir(tmp_path / f"maps-{p}")) for p in (SINGLE, RAY))
        assert m1 == m2 and len(m1) == sum(not r["error"] for r in file1)
        for f in m1:
            g1 = np.asarray(Image.open(tmp_path / f"maps-{SINGLE}" / f), dtype=np.int16)
            g2 = np.asarray(Image.open(tmp_path / f"maps-{RAY}" / f), dtype=np.int16)
            assert np.abs(g1 - g2).max() <= 1 and g1.max() == 255


def test_the_scenarios_cover_every_honoured_flag_on_both_paths():
    """Runs after the scenarios (same module, in order): each honoured flag was given to
    each path that honours it. Prints the count of flag x path combinations."""
    if not COVERED[SINGLE]:
        pytest.skip("the scenarios did not run (select the whole module)")
    for path in (SINGLE, RAY):
        want = {d for d, how in FLAGS.items() if how[path] == HONOURED} - {"ray"}
        if path == SINGLE:
            assert "ray" not in COVERED[path]
        missing = want - COVERED[path]
        assert not missing, f"{path} path: no scenario gives {sorted(missing)}"
    compared = len(COVERED[SINGLE] - {"ray"}) + len(COVERED[RAY] - {"ray"})
    print(f"flag x path combinations compared: {compared}; refused: {len(_refused())}")


def _image(path) -> str:
    from PIL import Image

    Image.fromarray(np.random.default_rng(2).integers(0, 255, (37, 45, 3), np.uint8)).save(path)
    return str(path)


# -- --graph against the model's kind (both paths, before any session or Ray) -------------

@pytest.mark.parametrize("path", [SINGLE, RAY])
def test_graph_must_agree_with_the_model_kind(path, distance_model, features_model, tmp_path,
                                             capsys):
    a = _image(tmp_path / "a.png")
    ray = ["--ray"] if path == RAY else []
    for graph, model, kind in (("lpips", distance_model[0], "distance"),
                               ("distance", features_model[0], "features")):
        code = main(["distance", a, a, "--graph", graph, "--model", model, *ray])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"--graph {graph}" in err and f"a {kind} model" in err


def test_the_kind_is_read_without_torch(distance_model, tmp_path):
    import subprocess
    import sys

    a = _image(tmp_path / "a.png")
    code = ("import sys\nfrom perceptual_engine.cli.main import main\n"
            f"rc = main(['distance', {a!r}, {a!r}, '--graph', 'lpips', '--model', "
            f"{distance_model[0]!r}])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "a distance model" in proc.stderr, proc.stderr


# -- --resume of a file that does not exist -----------------------------------------------

@pytest.mark.parametrize("path", [SINGLE, RAY])
@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_resume_of_a_missing_file_is_refused(path, ext, distance_model, tmp_path, capsys):
    if ext == ".parquet" and path == SINGLE:
        pytest.skip("Parquet is written by the Ray path only")
    out = tmp_path / f"typo{ext}"
    cache = tmp_path / "cache"
    a = _image(tmp_path / "a.png")
    argv = ["distance", a, a, "--weights", "random", "--layers", "relu1_1",
            "--cache-dir", str(cache), "--output", str(out), "--resume"]
    code = main(argv + (["--ray"] if path == RAY else []))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "does not exist" in err and "drop --resume to start a new file" in err
    assert not out.exists() and not cache.exists()  # refused before a model was exported


def test_result_file_refuses_to_resume_a_missing_file(tmp_path):
    from perceptual_engine.datasets.results import ResultFile
    from perceptual_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="drop --resume to start a new file"):
        ResultFile(str(tmp_path / "r.csv"), ["total"], resume=True)
    assert not (tmp_path / "r.csv").exists() and not (tmp_path / "r.csv.meta.json").exists()
