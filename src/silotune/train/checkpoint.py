"""Checkpoints: adapter (PEFT format), optimizer and scheduler, step and RNG, written atomically.

A checkpoint folder `checkpoints/step-00000010/` holds `adapter_config.json`,
`adapter_model.safetensors` (and `spf_deltas.safetensors` when the job trains SPF), `optimizer.pt` (optimizer and scheduler state dicts, read back with
`torch.load(weights_only=True)`, so no arbitrary objects are unpickled), `rng.safetensors` and
`trainer_state.json`, which lists the SHA-256 of every other file. A folder is written under a
temporary name and renamed when complete, so a crash never leaves a half checkpoint that looks whole,
and a damaged one is reported instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from silotune.adapters.peft_adapters import read_adapter_dir, save_adapter, set_adapter_state
from silotune.adapters.spf import restore_spf
from silotune.errors import CheckpointError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
STATE_VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` checkpoints."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_adapter(model, staging)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
            },
            staging / "optimizer.pt",
        )
        save_file(_rng_state(), staging / "rng.safetensors")
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        state = {"version": STATE_VERSION, "step": step, "files": files, "extra": extra or {}}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict[str, Any]:
    """Read and verify a checkpoint's manifest and file hashes; CheckpointError names the problem."""
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}; it is incomplete")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not valid JSON") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has an unknown format version (want {STATE_VERSION})"
        )
    for name, digest in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if _sha256(file) != digest:
            raise CheckpointError(
                f"checkpoint {path}: {name} is corrupt (its SHA-256 does not match)"
            )
    return state


def load_checkpoint(
    path: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG from `path`; returns the manifest."""
    state = read_state(path)
    _, tensors = read_adapter_dir(path)
    device = next(p.device for p in model.parameters())
    set_adapter_state(model, {k: v.to(device) for k, v in tensors.items()})
    restore_spf(model, path)
    try:
        opt = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        if scheduler is not None and opt["scheduler"] is not None:
            scheduler.load_state_dict(opt["scheduler"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path}: optimizer state does not fit this job ({err})"
        ) from None
    _set_rng_state(load_file(path / "rng.safetensors"))
    return state
