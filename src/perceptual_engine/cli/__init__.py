"""The command line: `perceptual-engine COMMAND` (entry point `main`).

main.py parses and dispatches; options.py holds the reusable option groups; pairs.py,
runner.py and results.py are the `distance` folder runner; cache.py the model cache;
info.py the `info` report; demo.py the quickstart's main job.
"""
from .main import main, run

__all__ = ["main", "run"]
