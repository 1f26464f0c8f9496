"""`python -m perceptual_engine.cli COMMAND`: the same as `perceptual-engine COMMAND`."""
import sys

from .main import main

sys.exit(main())
