"""The README and docs/ run as written.

Every fenced block of README.md and docs/*.md is checked:
- ```python blocks run, in order, in one namespace per page, from a scratch folder that
  holds `src/` (so the bundled photographs are where the docs say);
- ```bash blocks run their `perceptual-engine ...` lines and expect exit status 0 (install
  lines such as `pip` or `make` are left to the quickstart timing and to CI itself);
- ```text transcripts: every `$ perceptual-engine ...` line, and every command of a bash
  block, must parse with today's options (a renamed or removed flag fails here).
A block that needs the network, a GPU, a Ray cluster or a long run carries the marker
`<!-- docs-test: skip REASON -->` on the line before its fence and is reported as skipped
with that reason.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    out: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        prev = lines[i - 1] if i else ""
        s = SKIP.search(prev)
        out.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1:j]) + "\n",
                         (s.group(1) or "marked skip") if s else None))
        i = j + 1
    return out


ALL = [b for p in PAGES for b in blocks(p)]


def _commands(code: str, prompt: str) -> list[str]:
    """Lines of a block that call the CLI, continuation lines joined."""
    out, cur = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if cur:
            cur += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                out.append(cur)
                cur = ""
            continue
        if line.startswith(prompt + "perceptual-engine "):
            body = line[len(prompt):]
            if line.endswith("\\"):
                cur = body.rstrip("\\").strip()
            else:
                out.append(body)
    return out


def _argv(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    # Drop what the shell does around the command: pipes, redirections, `&&` chains.
    for stop in ("|", ">", "2>", "&&", ";", "2>&1"):
        if stop in words:
            words = words[:words.index(stop)]
    return words[1:]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    (folder / "src").symlink_to(ROOT / "src")
    return folder


def _env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["PERCEPTUAL_ENGINE_CACHE"] = str(scratch / "cache")
    return env


PY_PAGES = sorted({b.page for b in ALL if b.lang == "python"})


@pytest.mark.slow
@pytest.mark.parametrize("page", PY_PAGES, ids=[str(p.relative_to(ROOT)) for p in PY_PAGES])
def test_python_blocks_run(page, scratch, monkeypatch):
    todo = [b for b in ALL if b.page == page and b.lang == "python"]
    skipped = [b for b in todo if b.skip]
    monkeypatch.chdir(scratch)
    namespace: dict = {"__name__": "__docs__"}
    for b in todo:
        if b.skip:
            continue
        try:
            exec(compile(b.code, b.id, "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - the message names the block
            raise AssertionError(f"{b.id}: the python block fails as written: "
                                 f"{type(exc).__name__}: {exc}") from exc
    if skipped and len(skipped) == len(todo):
        pytest.skip("; ".join(f"{b.id}: {b.skip}" for b in skipped))


BASH = [b for b in ALL if b.lang == "bash" and _commands(b.code, "")]


@pytest.mark.slow
@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_bash_commands_run(block, scratch):
    if block.skip:
        pytest.skip(block.skip)
    for command in _commands(block.code, ""):
        proc = subprocess.run([sys.executable, "-m", "perceptual_engine.cli", *_argv(command)],
                              cwd=scratch, env=_env(scratch), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (f"{block.id}: `{command}` exited {proc.returncode}:\n"
                                      f"{proc.stderr[-2000:]}")


# Transcripts, and the commands of bash blocks (a skipped block's too), must parse;
# synopses with [optional] parts are left out.
TRANSCRIPTS = ([(b, c) for b in ALL if b.lang == "text" for c in _commands(b.code, "$ ")]
               + [(b, c) for b in BASH for c in _commands(b.code, "") if "[" not in c])


@pytest.mark.parametrize("block,command", TRANSCRIPTS,
                         ids=[f"{b.id}:{c.split()[1]}" for b, c in TRANSCRIPTS])
def test_transcript_commands_parse(block, command):
    from perceptual_engine.cli.main import build_parser

    try:
        build_parser().parse_args(_argv(command))
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"{block.id}: `{command}` no longer parses (exit {exc.code})")


def test_every_page_is_checked():
    """The collector sees fenced blocks on the pages that have commands or code."""
    assert any(b.page.name == "README.md" and b.lang == "python" for b in ALL)
    assert any(b.page.name == "cli.md" for b, _ in TRANSCRIPTS)


def test_metadata_page_names_every_key_and_graph_kind():
    from perceptual_engine.export.metadata import FIELDS, GRAPH_KINDS

    page = (ROOT / "docs" / "metadata.md").read_text(encoding="utf-8")
    missing = [k for k in FIELDS if f"| `{k}` |" not in page]
    assert not missing, f"docs/metadata.md has no row for the keys {missing}"
    kinds = [g for g in GRAPH_KINDS if f"`{g}`" not in page]
    assert not kinds, f"docs/metadata.md does not name the graph kinds {kinds}"
