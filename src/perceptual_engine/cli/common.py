"""What every command module shares: the program's name and its stderr voice."""
from __future__ import annotations

import signal
import sys

PROG = "perceptual-engine"


# Set by main()'s SIGINT handler. A KeyboardInterrupt raised while the interpreter runs
# a callback (a weakref's, during an import) is printed and dropped, so the run would go
# on after Ctrl-C: every progress line checks this and raises it again.
INTERRUPTED = [False]
# The signal that interrupted the run (SIGINT or SIGTERM), set by the same handler.
RECEIVED: list[int | None] = [None]


def interrupt_status() -> int:
    """128 + the signal: 143 after SIGTERM, else 130 (Ctrl-C)."""
    return 128 + signal.SIGTERM if RECEIVED[0] == signal.SIGTERM else 130


def interrupt_word() -> str:
    return "terminated (SIGTERM)" if RECEIVED[0] == signal.SIGTERM else "interrupted"


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came and was swallowed on its way."""
    if INTERRUPTED[0]:
        raise KeyboardInterrupt


def report_interrupt(bar, output: str | None) -> int:
    """After Ctrl-C (or SIGTERM) in a run that writes rows: close the progress bar, say
    where the rows computed so far are (once, without raising the interrupt again),
    return 130 (143 after SIGTERM)."""
    bar.close()
    kept = f"; the rows computed so far are in {output}, rerun with --resume" if output else ""
    print(f"{PROG}: {interrupt_word()}{kept}", file=sys.stderr, flush=True)
    return interrupt_status()


def say(msg: str) -> None:
    """One line on stderr, prefixed with the program's name (a point where a swallowed
    Ctrl-C is raised again)."""
    check_interrupted()
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)
