"""`python -m perceptual_engine.bench [options]`: the bench subcommand on its own."""
from __future__ import annotations

import argparse
import sys

from .cli import DESCRIPTION, add_arguments, main


def _entry(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perceptual_engine.bench", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_entry())
