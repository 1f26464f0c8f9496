"""Ray Data distances: the same rows as the single-machine command, a killed actor, resume.

Ray runs locally with 2 CPUs and no dashboard, started once for the session (conftest's
``local_ray``, shared with test_distance_paths.py). The
model is conftest's shallow distance model (VGG19 to relu3_1, seeded random weights),
the images a folder of about 30 small pairs of odd sizes with bad and one-sided files.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from perceptual_engine.cli.main import main  # noqa: E402
from perceptual_engine.datasets.pairs import pair_folders  # noqa: E402
from perceptual_engine.distributed import distances, write_distances  # noqa: E402

REL = 1e-6  # float32 outputs of one model on one provider; batch composition may differ


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two folders: 24 computable pairs in 4 odd sizes (gray, RGBA and 16-bit files among
    them, some in a subfolder), plus a size mismatch, a tiny pair, a corrupt file, an
    empty file and three files present on one side only."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pairs")
    a, b = root / "a", root / "b"
    for side in (a, b):
        (side / "sub").mkdir(parents=True)
    rng = np.random.default_rng(12)
    sizes = [(19, 23), (25, 21), (23, 23), (21, 27)]

    def save(path, h, w, mode="RGB"):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr)
        if mode == "L":
            img = img.convert("L")
        elif mode == "RGBA":
            img = img.convert("RGBA")
            img.putalpha(Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8)))
        img.save(path)

    for i in range(24):
        h, w = sizes[i % 4]
        rel = f"sub/p{i:02d}.png" if i % 5 == 0 else f"p{i:02d}.png"
        save(a / rel, h, w, "L" if i == 3 else "RGB")
        save(b / rel, h, w, "RGBA" if i == 7 else "RGB")
    save(a / "mismatch.png", 19, 23)
    save(b / "mismatch.png", 23, 19)
    save(a / "tiny.png", 2, 3)
    save(b / "tiny.png", 2, 3)
    save(a / "corrupt.png", 19, 23)
    (b / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    (a / "empty.png").write_bytes(b"")
    save(b / "empty.png", 19, 23)
    save(a / "only_a1.png", 19, 23)
    save(a / "sub" / "only_a2.png", 19, 23)
    save(b / "only_b.png", 19, 23)
    return str(a), str(b)


@pytest.fixture(scope="module")
def single_rows(folder, distance_model, tmp_path_factory):
    """Rows of the single-machine command (``distance A B --output rows.jsonl``)."""
    out = tmp_path_factory.mktemp("single") / "rows.jsonl"
    code = main(["distance", *folder, "--model", distance_model[0], "--output", str(out),
                 "--format", "csv", "--batch-size", "4"])
    assert code == 1  # some pairs fail on purpose
    return _keyed(_read(str(out)))


def _read(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        rows = pq.read_table(path).to_pylist()
    elif path.endswith(".csv"):
        import csv

        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            for k, v in r.items():
                if k not in ("a", "b", "error"):
                    r[k] = float(v) if v else None
    else:
        with open(path) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    for r in rows:
        r["error"] = r["error"] or ""
    return rows


def _keyed(rows: list[dict]) -> dict[tuple[str, str], dict]:
    keys = [(r["a"], r["b"]) for r in rows]
    assert len(keys) == len(set(keys)), "a pair appears more than once"
    return dict(zip(keys, rows))


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    failed = 0
    for key, w in want.items():
        g = got[key]
        assert list(g) == list(w), key
        assert g["error"] == w["error"], key
        failed += bool(w["error"])
        for col in list(w)[2:-1]:
            if w[col] is None:
                assert g[col] is None, (key, col)
            else:
                assert g[col] == pytest.approx(w[col], rel=REL), (key, col)
    assert 0 < failed < len(want)  # both kinds of row are compared


def test_rows_equal_single_machine_one_actor(local_ray, folder, distance_model, single_rows,
                                             tmp_path):
    out = str(tmp_path / "rows.csv")
    # The model reaches the actor through the object store, as on a cluster of several nodes.
    stats = write_distances(*folder, model=distance_model[0], output=out, actors=1, batch_size=4,
                            share="object-store")
    rows = _read(out)
    _same(_keyed(rows), single_rows)
    assert len(single_rows) == 31 and (stats.ok, stats.failed) == (24, 7)
    assert sum(1 for r in rows if "only in" in r["error"]) == 3


def test_two_actors_resume_a_partial_parquet_cli(local_ray, folder, distance_model, single_rows,
                                                 tmp_path, capsys):
    """The command line with 2 actors completes what an interrupted run left: rows equal
    to the single-machine ones, each pair once, the kept rows not recomputed."""
    from perceptual_engine.datasets.results import model_identity
    from perceptual_engine.distributed.output import ParquetResultFile
    from perceptual_engine.runtime import read_info

    out = str(tmp_path / "rows.parquet")
    done = [r for r in single_rows.values() if not r["error"]][:10]
    failed = next(r for r in single_rows.values() if r["error"] and "only in" not in r["error"])
    info = read_info(distance_model[0])
    partial = ParquetResultFile(out, info.output_names, identity=model_identity(info))
    for r in done + [failed]:  # what an interrupted run leaves
        partial.write(r)
    partial.close()
    code = main(["distance", *folder, "--model", distance_model[0], "--ray", "--ray-actors", "2",
                 "--batch-size", "4", "--output", out, "--resume", "--format", "csv"])
    assert code == 1  # some pairs fail on purpose
    rows = _keyed(_read(out))
    _same(rows, single_rows)
    for r in done:  # kept as they were
        assert rows[(r["a"], r["b"])] == dict(r, error="")
    err = capsys.readouterr().err
    summary = [line for line in err.splitlines() if "pair(s):" in line][-1]
    assert "31 pair(s): 14 ok, 7 failed, 10 skipped" in summary and "on 2 actor(s)" in summary


def _actor_pids() -> list[int]:
    """Processes of this test's Ray (descendants of this process) running DistanceActor,
    read from /proc (Ray titles its actor processes after their class)."""
    parent, title = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                title[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue

    def ours(pid: int) -> bool:
        seen = set()
        while pid in parent and pid not in seen:
            if parent[pid] == os.getpid():
                return True
            seen.add(pid)
            pid = parent[pid]
        return False

    return [pid for pid, t in title.items() if "DistanceActor" in t and ours(pid)]


def test_killed_actor_is_replaced_and_its_batch_redone(local_ray, folder, distance_model,
                                                        single_rows):
    # Pairs given as a Ray Dataset of paths (one-sided pairs carry their error column).
    items = [{"a": p.a, "b": p.b, "error": p.error} for p in pair_folders(*folder)]
    ds = distances(dataset=ray.data.from_items(items, override_num_blocks=8),
                   model=distance_model[0], actors=1, batch_size=1)
    rows, killed, before = [], [], []
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += table.to_pylist()
        if not killed:
            pids = _actor_pids()
            assert len(pids) == 1, pids
            before.append(len(rows))
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
    assert before[0] < len(single_rows) - 2, "the job ended before the actor was killed"
    assert killed[0] not in _actor_pids()
    _same(_keyed(rows), single_rows)  # every pair exactly once
    # Decoding ran in its own CPU tasks, not fused into the Engine actors.
    plan = ds.stats()
    assert "MapBatches(decode_batch)->" not in plan and "MapBatches(DistanceActor)" in plan


def test_without_ray_installed(distance_model, folder):
    """`import perceptual_engine` leaves Ray alone; --ray without Ray says how to install it."""
    code = ("import sys; import perceptual_engine, perceptual_engine.distributed\n"
            "from perceptual_engine.cli.main import main\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n"
            "sys.modules['ray'] = None\n"
            f"sys.exit(main(['distance', {folder[0]!r}, {folder[1]!r}, '--model', "
            f"{distance_model[0]!r}, '--ray']))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'perceptual-engine[ray]'" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
