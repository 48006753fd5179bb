"""When a run logs, evaluates, syncs and checkpoints: one schedule for every mode.

Steps are counted from 1 (``done``, the number of optimizer steps or rounds finished). Every
periodic event also happens at the last step, so a run always ends logged, evaluated and saved.
"""

from __future__ import annotations

from dataclasses import dataclass

from silotune.config import JobConfig

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """The run's length and the periods of its events (all >= 1)."""

    total: int
    log_every: int = 1
    eval_every: int = 1
    sync_every: int = 1

    def __post_init__(self) -> None:
        for name in ("total", "log_every", "eval_every", "sync_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"Schedule.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def steps(cls, cfg: JobConfig) -> Schedule:
        """Step-based modes (centralized, split, adapter-in-TEE): ``train.*`` and ``split``."""
        t = cfg.train
        return cls(t.max_steps, t.log_every, t.eval_every, cfg.split.sync_every)

    @classmethod
    def rounds(cls, cfg: JobConfig) -> Schedule:
        """Federated mode: one log record per round, evaluation every ``federation.eval_every``."""
        fed = cfg.federation
        return cls(fed.rounds, 1, fed.eval_every, 1)

    def _at(self, done: int, every: int) -> bool:
        return done % every == 0 or done == self.total

    def logs(self, done: int) -> bool:
        return self._at(done, self.log_every)

    def evaluates(self, done: int) -> bool:
        return self._at(done, self.eval_every)

    def syncs(self, done: int) -> bool:
        return self._at(done, self.sync_every)
