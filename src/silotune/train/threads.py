"""How many torch threads each process of a job uses (``train.threads``).

Processes of one job that share a machine (simulated federated silos, split's coordinator and
silos on one host, an enclave process beside its host) each get an equal share of the cores by
default: OpenMP pools that together ask for more threads than there are cores fight for them, and
steps then run 10-100 times slower (docs/federated.md). An ``OMP_NUM_THREADS`` in the environment
caps the share (a machine shared with other jobs), and ``train.threads`` overrides both.
"""

from __future__ import annotations

import os

import torch

from silotune.config import JobConfig

__all__ = ["apply_threads", "cores", "threads_per_process"]


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_process(cfg: JobConfig, processes: int = 1) -> int:
    """``train.threads`` if set, else this machine's cores divided among ``processes``, at most
    ``OMP_NUM_THREADS`` when the environment sets it."""
    if cfg.train.threads is not None:
        return cfg.train.threads
    share = max(1, cores() // max(1, processes))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(cap)) if cap.isdigit() and int(cap) > 0 else share


def apply_threads(threads: int) -> None:
    """Use ``threads`` torch (intra-op) threads in this process from now on."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
