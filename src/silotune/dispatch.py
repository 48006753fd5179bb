"""Run a job in the mode its config names; each mode lives in its own package."""

from __future__ import annotations

from typing import Any

from silotune.config import JobConfig
from silotune.errors import ConfigError


def run_job(
    cfg: JobConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train `cfg`; returns the run summary (also written to `output_dir/summary.json`)."""
    if cfg.adapter.placement == "enclave" and cfg.mode == "split":
        raise ConfigError(
            "adapter.placement enclave runs in modes centralized and federated, not split (for "
            "split mode the trunk can run in an enclave: split.trunk_in_enclave)"
        )
    if cfg.mode == "federated" and cfg.adapter.placement == "enclave":
        from silotune.adapter_tee.fed_host import train_federated_in_enclaves

        return train_federated_in_enclaves(
            cfg, resume=resume, overwrite=overwrite, progress=progress
        )
    if cfg.mode == "centralized" and cfg.adapter.placement == "enclave":
        from silotune.adapter_tee.runner import train_in_enclave

        return train_in_enclave(cfg, resume=resume, overwrite=overwrite, progress=progress)
    if cfg.mode == "centralized":
        from silotune.train.trainer import train_centralized

        return train_centralized(cfg, resume=resume, overwrite=overwrite, progress=progress)
    if cfg.mode == "split":
        from silotune.split.runner import train_split

        return train_split(cfg, resume=resume, overwrite=overwrite, progress=progress)
    if cfg.mode == "federated":
        from silotune.federated.simulation import train_federated_simulation

        return train_federated_simulation(
            cfg, resume=resume, overwrite=overwrite, progress=progress
        )
    raise ConfigError(f"unknown mode '{cfg.mode}' (allowed: centralized, federated, split)")
