"""train.threads: each process of a job gets its share of the cores, or the configured count."""

from __future__ import annotations

import pytest
import torch

from silotune.federated.silo import silo_threads, simulated_workers
from silotune.federated.simulation import backend_config
from silotune.train import threads as threads_mod
from silotune.train.threads import apply_threads, threads_per_process


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads_mod, "cores", lambda: 8)
    monkeypatch.setattr("silotune.federated.silo.cores", lambda: 8)


def test_default_divides_the_cores_among_the_processes(make_job, eight_cores) -> None:
    cfg = make_job()
    assert threads_per_process(cfg) == 8
    assert threads_per_process(cfg, 3) == 2
    assert threads_per_process(cfg, 16) == 1  # never zero
    assert threads_per_process(make_job("train.threads=3"), 3) == 3  # the setting wins


def test_simulated_silos_share_the_cores_and_deployed_ones_take_them(make_job, eight_cores):
    sim = make_job("mode=federated", "federation.silos=3")
    assert simulated_workers(sim) == 3 and silo_threads(sim) == 2
    assert backend_config(sim)["init_args"]["num_cpus"] == 3
    many = make_job("mode=federated", "federation.silos=20")
    assert simulated_workers(many) == 8 and silo_threads(many) == 1
    deployed = make_job("mode=federated", "federation.silos=3", "federation.simulation=false")
    assert silo_threads(deployed) == 8


def test_omp_num_threads_caps_the_share(make_job, eight_cores, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_process(make_job()) == 3
    assert threads_per_process(make_job(), 4) == 2
    assert threads_per_process(make_job("train.threads=5")) == 5  # the setting wins
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty or junk: no cap
    assert threads_per_process(make_job()) == 8


def test_threads_must_be_positive(make_job) -> None:
    from silotune.errors import ConfigError

    with pytest.raises(ConfigError, match="threads"):
        make_job("train.threads=0")


def test_centralized_training_applies_the_setting(make_job) -> None:
    from silotune.train.trainer import train_centralized

    before = torch.get_num_threads()
    try:
        train_centralized(make_job("train.threads=1", "train.max_steps=1"), progress=False)
        assert torch.get_num_threads() == 1
    finally:
        apply_threads(before)
