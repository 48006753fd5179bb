"""One schedule decides when every mode logs, evaluates and syncs (train/schedule.py)."""

import pytest

from silotune.config import config_from_dict
from silotune.train.schedule import Schedule


def test_events_fall_on_their_period_and_always_on_the_last_step() -> None:
    s = Schedule(total=10, log_every=3, eval_every=4, sync_every=5)
    assert [d for d in range(1, 11) if s.logs(d)] == [3, 6, 9, 10]
    assert [d for d in range(1, 11) if s.evaluates(d)] == [4, 8, 10]
    assert [d for d in range(1, 11) if s.syncs(d)] == [5, 10]


def test_schedules_come_from_the_job_config() -> None:
    cfg = config_from_dict(
        {
            "mode": "split",
            "train": {"max_steps": 7, "log_every": 2, "eval_every": 3},
            "split": {"sync_every": 4},
            "federation": {"rounds": 5, "eval_every": 2},
        }
    )
    assert Schedule.steps(cfg) == Schedule(7, 2, 3, 4)
    assert Schedule.rounds(cfg) == Schedule(5, 1, 2, 1)
    with pytest.raises(ValueError, match="eval_every must be >= 1"):
        Schedule(5, 1, 0)
