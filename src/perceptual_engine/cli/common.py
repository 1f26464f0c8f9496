"""What every command module shares: the program's name and its stderr voice."""
from __future__ import annotations

import sys

PROG = "perceptual-engine"


def say(msg: str) -> None:
    """One line on stderr, prefixed with the program's name."""
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)
