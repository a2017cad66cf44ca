"""How many CPU threads the bench and the demo give torch when the user did not say."""

from __future__ import annotations

import os


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """``(threads, why)``: `requested` if given; else, when ``OMP_NUM_THREADS`` is unset, the cores the load average
    leaves idle (at least 1, at most torch's default). OpenMP's spinning threads make small models several times
    slower when other work holds the cores (the demo: 25.9 s with 2 threads on a busy 2-core box, 8.6 s with 1)."""
    import torch

    default = torch.get_num_threads()
    if requested is not None:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return default, "OMP_NUM_THREADS"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return default, "torch's default"
    idle = max(1, min(default, (os.cpu_count() or default) - round(load)))
    return idle, f"idle cores (load average {load:.1f}); pass --threads or OMP_NUM_THREADS to override"
