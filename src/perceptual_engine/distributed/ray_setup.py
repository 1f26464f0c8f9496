"""Ray itself: imported only when a job asks for it (ConfigError with the install command
otherwise), started or joined quietly, and Ray Data's progress bars and logs turned off
(the command line draws its own)."""
from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError

INSTALL = "pip install 'perceptual-engine[ray]'"


def import_ray():
    """The ray module, or ConfigError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"Ray Data is not installed ({exc}); distances on Ray need it: "
                          f"{INSTALL}.") from exc
    return ray


def start_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect to ``address``, or start a local Ray sized to this machine, quietly.

    An already initialized Ray (``ray.init`` by the caller) is used as it is.
    Returns True if this call started or connected it (the caller shuts it down).
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        ray.init(address=address, **kw)
    else:  # CPUs and GPUs detected by Ray; no dashboard for a one-off job
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kw)
    return True


def _quiet_data_context():
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the command line draws its own
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # e.g. "progress bars disabled"
    return ctx
