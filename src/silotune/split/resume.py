"""Split checkpoints and ``--resume``: the coordinator's trunk and each silo's head and tail.

Both sides write the centralized checkpoint format (:mod:`silotune.train.checkpoint`: adapter in
PEFT format, ``optimizer.pt`` read back with ``weights_only=True``, RNG, a manifest of SHA-256
hashes) at the silos' sync steps (``split.sync_every`` and the last step):

* a silo in ``output_dir/checkpoints/`` right after the averaged adapter came back, so it holds
  the last synced head/tail adapter, its optimizer, scheduler and step;
* the coordinator in its own ``output_dir/checkpoints/`` once every live silo has committed that
  step: the trunk adapter, the trunk's optimizer and scheduler, and its step count.

``silotune serve --resume`` and ``silotune join --resume`` restart from the newest checkpoint, with
the same rules as a centralized run: the config may change only in keys that do not change what
is computed (and, in split mode, where the coordinator is and which key and TLS files are used);
otherwise the error names the key. A silo that resumes continues at its checkpoint's step.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from silotune.errors import CheckpointError, ConfigError
from silotune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from silotune.train.schedule import Schedule

if TYPE_CHECKING:
    from peft import PeftModel

    from silotune.config import JobConfig
    from silotune.split.engines import TrunkEngine

__all__ = ["TrunkCheckpoints", "restore_silo", "restore_trunk", "save_silo"]

log = logging.getLogger(__name__)


def _latest(run_dir: Path) -> Path:
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"--resume: {run_dir} holds no checkpoint to resume from")
    return path


def restore_silo(
    run_dir: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_steps: int,
    secagg_history: dict[str, int] | None = None,
) -> int:
    """Load a silo's newest checkpoint (head/tail adapter, optimizer, RNG); return its step.

    ``secagg_history`` (the secure-averaging rounds this silo contributed to, by job) is
    restored too, so a restarted silo still refuses a round it already took part in.
    """
    path = _latest(run_dir)
    state = load_checkpoint(path, model, optimizer, scheduler)
    step = int(state["step"])
    saved = state.get("extra", {}).get("secagg_history", {})
    if secagg_history is not None and isinstance(saved, dict):
        secagg_history.update({str(k): int(v) for k, v in saved.items()})
    if step > max_steps:
        raise ConfigError(
            f"--resume: the checkpoint is at step {step}, past train.max_steps {max_steps}"
        )
    log.info("Silo resumes from %s (step %d).", path, step)
    return step


def save_silo(
    run_dir: Path,
    done: int,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: JobConfig,
    silo: str,
    secagg_history: dict[str, int] | None = None,
) -> None:
    """Checkpoint a silo right after a sync: its synced adapter, optimizer and step."""
    extra = {"role": "silo", "silo": silo, "secagg_history": dict(secagg_history or {})}
    save_checkpoint(
        run_dir, done, model, optimizer, scheduler, extra, keep=cfg.train.keep_checkpoints
    )


def restore_trunk(run_dir: Path, engine: TrunkEngine, model: PeftModel) -> int:
    """Load the coordinator's newest checkpoint into the trunk; return the silos' step it holds."""
    path = _latest(run_dir)
    replica = engine.main
    if replica.optimizer is None:
        raise ConfigError("--resume: this trunk trains no adapter; there is nothing to resume")
    state = load_checkpoint(path, model, replica.optimizer, replica.scheduler)
    engine.commits = int(state.get("extra", {}).get("trunk_steps", 0))
    engine.resumed = True
    log.info("Trunk resumes from %s (silo step %d, %d trunk steps).", path, state["step"],
             engine.commits)  # fmt: skip
    return int(state["step"])


def copy_optimizer(source: Any, target: Any) -> None:
    """Give a fresh trunk replica the restored optimizer and schedule (hierarchical resume)."""
    if source.optimizer is not None and target.optimizer is not None:
        target.optimizer.load_state_dict(copy.deepcopy(source.optimizer.state_dict()))
    if source.scheduler is not None and target.scheduler is not None:
        target.scheduler.load_state_dict(copy.deepcopy(source.scheduler.state_dict()))


class TrunkCheckpoints:
    """Writes the coordinator's checkpoint when every live silo has committed a sync step.

    Parameters
    ----------
    run_dir
        The coordinator's ``output_dir``.
    engine
        The trunk engine (its roster tells which silos are live).
    model
        The coordinator's PEFT model (the trunk is a view on it).
    cfg
        The job (sync steps, ``train.keep_checkpoints``).
    """

    def __init__(self, run_dir: Path, engine: TrunkEngine, model: PeftModel, cfg: JobConfig):
        self.run_dir, self.engine, self.model = run_dir, engine, model
        self.schedule = Schedule.steps(cfg)
        self.keep = cfg.train.keep_checkpoints
        self.saved = 0  # newest step saved (or resumed from)
        self._committed: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def committed(self, member: str, done: int) -> None:
        """Silo ``member`` committed step ``done``; save once every live silo has."""
        if not 0 < done <= self.schedule.total or not self.schedule.syncs(done):
            return
        with self._lock:
            if done <= self.saved:
                return
            members = self._committed.setdefault(done, set())
            members.add(member)
            if not self.engine.roster.live <= members:
                return
            self._save(done)
            self.saved = done
            for step in [s for s in self._committed if s <= done]:
                del self._committed[step]

    def _save(self, done: int) -> None:
        engine = self.engine
        with engine.lock:
            replica = engine.checkpoint_replica()  # its optimizer; the adapter is in the model
            if replica.optimizer is None:
                return
            extra = {"role": "coordinator", "trunk_steps": engine.commits}
            save_checkpoint(
                self.run_dir, done, self.model, replica.optimizer, replica.scheduler, extra,
                keep=self.keep,
            )  # fmt: skip
        log.info("Trunk checkpoint at silo step %d.", done)
