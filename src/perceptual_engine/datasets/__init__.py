"""Library layer for work over many images: pair discovery (``pairs``), result files with
their lock, sidecar and resume rules (``results``), the model cache (``cache``) and the
batch runner with its progress line (``runner``). The command line, the Ray path, the
benchmark and the demo all use these; nothing here imports from ``cli/``.
"""
