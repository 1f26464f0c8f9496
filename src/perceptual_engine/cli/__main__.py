"""`python -m perceptual_engine.cli COMMAND`: the same as `perceptual-engine COMMAND`."""
from .main import run

run()
