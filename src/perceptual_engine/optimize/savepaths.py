"""Where image optimization writes: the ``{step}`` template of ``stylize -o`` and
``save_path``, checked before any work.

The rule: braces in the path are a ``str.format`` template with one field,
``{step}`` (the number of steps done), optionally with an integer format spec
(``{step:04d}``), and only in the file name. Literal braces are written ``{{``
and ``}}``. Anything else in braces (``{steps}``, ``{}``, ``{0}``, ``{step:q}``,
``{step.real}``, an unmatched brace) is refused up front, so a run never fails
at its first save, nor writes a file named after the template.

``check_save_path`` then checks every path the run may write, before the first
step: the folder exists and is writable, no destination is a folder, the
extension is one Pillow writes, and no destination is the content or style image
(by any spelling: ``./a.png``, ``sub/../a.png``, a symlink, a hard link) unless
``overwrite_input`` says so.
"""
from __future__ import annotations

import os
import re
import string
from typing import Any, Iterable

from ..errors import ConfigError

# What a formatted {step} may look like: digits, signs, padding, hex letters; never a
# path separator or a control character.
_STEP_TEXT = re.compile(r"[0-9A-Za-z +\-_.,]*")
_FIELD = "step"


def has_fields(path: str) -> bool:
    """Whether ``path`` (already validated) contains a ``{step}`` field."""
    return any(field is not None for _, field, _, _ in string.Formatter().parse(path))


def check_template(path: str | os.PathLike, what: str = "save_path") -> str:
    """``path`` as a str if its braces follow the rule above, else ConfigError naming ``what``."""
    text = os.fspath(path)
    fix = (f"accepted in {what}: {{step}} (the step number, e.g. 'out-{{step:04d}}.png') in the "
           "file name; write a literal brace as {{ or }}.")
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r} has an unmatched brace ({exc}); {fix}") from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field != _FIELD or conversion is not None:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + "}"
            raise ConfigError(f"{what} {text!r} has the field {shown}; {fix}")
        for step in (0, 7, 12345678):
            try:
                done = format(step, spec)
            except (ValueError, TypeError, OverflowError):
                raise ConfigError(f"{what} {text!r}: {{step:{spec}}} is not an integer format "
                                  f"(e.g. {{step:04d}}); {fix}") from None
            if not _STEP_TEXT.fullmatch(done):
                raise ConfigError(f"{what} {text!r}: {{step:{spec}}} gives {done!r}, which is not "
                                  f"a plain file-name part; {fix}")
    if has_fields(os.path.dirname(text)):
        raise ConfigError(f"{what} {text!r} has {{step}} in its folder; {fix}")
    return text


def expand(path: str, step: int) -> str:
    """The file written after ``step`` steps (``path`` validated by check_template)."""
    return path.format(step=step)


def check_save_path(path: str | os.PathLike, *, steps: Iterable[int], inputs: Iterable[Any] = (),
                    overwrite_input: bool = False, what: str = "save_path",
                    overwrite_flag: str = "overwrite_input=True") -> str:
    """Validate ``path`` and every file it names for ``steps`` (the step counts at which
    the run may write); returns ``path`` as a str. ``inputs``: the content and style
    images (paths; anything else is skipped), which no destination may be unless
    ``overwrite_input``. ``what`` and ``overwrite_flag`` name the argument and the
    override in messages (the command line passes its flags). Raises ConfigError."""
    from .._io import check_destination
    from ..images import WRITABLE_EXAMPLES, writable_format

    text = check_template(path, what)
    first = expand(text, 0)
    check_destination(first, what, "out.png")
    # Fields sit in the file name only, so every destination shares this folder, spelled
    # as given: abspath folds 'sub/..' lexically, where the kernel needs 'sub' to exist
    # (and follows it if it is a symlink).
    folder = os.path.dirname(first) or os.curdir
    if not os.path.isdir(folder):
        raise ConfigError(f"{what} {text!r}: the folder {folder!r} does not exist; create it "
                          "first or give another path.")
    if writable_format(first) is None:
        raise ConfigError(f"{what} {text!r} has no image extension Pillow writes; accepted: "
                          f"{WRITABLE_EXAMPLES}, ... e.g. out.png.")
    names = {os.path.basename(expand(text, k)) for k in steps} if has_fields(text) \
        else {os.path.basename(first)}
    if len(names) == 1:
        existing = [os.path.join(folder, n) for n in names if os.path.lexists(os.path.join(folder, n))]
    else:  # one listing instead of a stat per possible step
        existing = [e.path for e in os.scandir(folder) if e.name in names]
    originals = [os.fspath(p) for p in inputs if isinstance(p, (str, os.PathLike))]
    for dest in existing:
        if os.path.isdir(dest):
            raise ConfigError(f"{what} {text!r} would write {dest!r}, which is a folder; give "
                              "another file name.")
        if overwrite_input:
            continue
        for original in originals:
            if _same_file(dest, original):
                raise ConfigError(
                    f"{what} {text!r} would overwrite {original!r} ({dest!r} is the same file), "
                    f"an input image of this run; give another path, or {overwrite_flag} to "
                    "replace it.")
    return text


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # follows symlinks; equal inodes catch hard links
    except OSError:  # a dangling symlink, or an input that does not exist (reported elsewhere)
        return os.path.realpath(a) == os.path.realpath(b)
