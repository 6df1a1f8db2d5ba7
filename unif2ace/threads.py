"""CPU thread count for the commands (`--threads`).

torch uses every core by default. On a machine whose cores are already busy, that oversubscribes them: measured
on a shared 2-core machine, a `small`-preset training step took 22–25 s with 2 threads and 1.9–2.9 s with one.
So `--threads 0` (the default) means: all cores (divided among the processes torchrun starts on this machine), or
one thread when the load average already exceeds 3/4 of the cores.
"""
from __future__ import annotations

import os

import torch

BUSY_LOAD_FRACTION = 0.75


def auto_threads() -> tuple[int, str]:
    """(threads, why) for this process: cores // local processes, or 1 on a busy machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = max(1, cores // local)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > BUSY_LOAD_FRACTION * cores and share > 1:
        return 1, f"machine busy: load {load:.1f} on {cores} cores"
    return share, f"{cores} cores" + (f", {local} processes" if local > 1 else "")


def set_threads(requested: int = 0) -> str:
    """Sets torch's intra-op thread count (`requested` > 0, or `auto_threads()` for 0) and returns a short
    description for the log, e.g. "1 CPU thread (machine busy: load 6.2 on 2 cores; --threads N to override)"."""
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0 = automatic), got {requested}")
    if requested:
        n, why = requested, "--threads"
    else:
        n, why = auto_threads()
        why += "; --threads N to override"
    torch.set_num_threads(n)
    return f"{n} CPU thread{'s' if n != 1 else ''} ({why})"
