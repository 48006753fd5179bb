"""Run one attack on one job: observe (a real in-process run), attack, score, cost; one result row.

A row is ``{"setting": {...}, "leakage": .., "chance": .., "cost": {...}, ...}`` as in
``silotune bench privacy``'s JSON line. Tables and inverters are cached per public setting, so a
grid of settings pays for each once.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from silotune.attacks import ATTACKS
from silotune.attacks.observe import SplitObservation, observe_split
from silotune.attacks.public import PublicModel, public_model
from silotune.attacks.split_inversion import (
    Inverter,
    TokenTable,
    invert_ciphertext,
    invert_learned,
    invert_nearest,
    token_table,
    train_inverter,
)
from silotune.attacks.split_labels import infer_labels
from silotune.config import JobConfig
from silotune.errors import ConfigError

__all__ = ["AttackCache", "run_attack", "setting_of"]


class AttackCache:
    """Public models, token tables and inverters, keyed by what they depend on."""

    def __init__(self, inverter_steps: int = 300, inverter_texts: int = 2000) -> None:
        self.inverter_steps = inverter_steps
        self.inverter_texts = inverter_texts
        self._pub: dict[tuple[Any, ...], PublicModel] = {}
        self._tables: dict[tuple[Any, ...], TokenTable] = {}
        self._inverters: dict[tuple[Any, ...], Inverter] = {}

    def pub(self, cfg: JobConfig) -> PublicModel:
        key = (cfg.model.name, cfg.split.head_layers, cfg.split.tail_layers, cfg.data.dataset)
        if key not in self._pub:
            self._pub[key] = public_model(cfg)
        return self._pub[key]

    def table(self, cfg: JobConfig) -> TokenTable:
        key = (cfg.model.name, cfg.split.head_layers, cfg.split.noise_sigma, cfg.data.dataset)
        if key not in self._tables:
            self._tables[key] = token_table(self.pub(cfg), cfg)
        return self._tables[key]

    def inverter(self, cfg: JobConfig) -> Inverter:
        s = cfg.split
        key = (cfg.model.name, s.head_layers, s.noise_sigma, s.activation_dtype, cfg.data.dataset)
        if key not in self._inverters:
            self._inverters[key] = train_inverter(
                self.pub(cfg),
                self.table(cfg),
                cfg,
                texts=self.inverter_texts,
                steps=self.inverter_steps,
            )
        return self._inverters[key]


def setting_of(cfg: JobConfig, trained_steps: int) -> dict[str, Any]:
    """The settings an attack's leakage depends on."""
    s = cfg.split
    return {
        "model": cfg.model.name,
        "head_layers": s.head_layers,
        "tail_layers": s.tail_layers,
        "noise_sigma": s.noise_sigma,
        "activation_dtype": s.activation_dtype,
        "trunk_in_enclave": s.trunk_in_enclave,
        "trained_steps": trained_steps,
    }


def cost_of(obs: SplitObservation) -> dict[str, float]:
    """Step time (mean without the first step), last loss and test accuracy of the observed run."""
    steps = obs.step_seconds[1:] or obs.step_seconds
    cost = {"step_s": statistics.mean(steps), "loss": obs.losses[-1]}
    if obs.test:
        cost["accuracy"] = obs.test["accuracy"]
    return cost


def run_attack(
    name: str,
    cfg: JobConfig,
    *,
    trained_steps: int = 0,
    observe_steps: int = 2,
    eval_examples: int = 0,
    adapter: Path | None = None,
    cache: AttackCache | None = None,
    obs: SplitObservation | None = None,
) -> dict[str, Any]:
    """Observe ``trained_steps + observe_steps`` steps of ``cfg`` and attack the last ones.

    ``adapter`` (a finished run's ``adapter/`` folder) starts the silo from trained adapters.
    A caller that already has the observation of this setting passes it as ``obs``.
    """
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack '{name}' (available: {', '.join(ATTACKS)})")
    if name == "tee-masks":
        from silotune.attacks.tee_masks import run_tee

        return run_tee(cfg)
    if name == "tee-weights":
        from silotune.attacks.tee_weights import run_tee_weights

        return run_tee_weights(cfg)
    if name == "federated-mia":
        from silotune.attacks.federated_mia import MIA_SETTINGS, run_mia

        return run_mia(cfg, MIA_SETTINGS)
    if cfg.mode != "split":
        raise ConfigError(f"attack '{name}' needs a job with mode: split, got mode '{cfg.mode}'")
    cache = cache or AttackCache()
    if name == "split-ciphertext" and not cfg.split.trunk_in_enclave:
        cfg = cfg.model_copy(deep=True)
        cfg.split.trunk_in_enclave = True
    timing: dict[str, float] = {}
    if obs is None:
        clock = time.perf_counter()
        obs = observe_split(
            cfg, trained_steps + observe_steps, eval_examples=eval_examples, adapter=adapter
        )
        timing["observe_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if name == "split-nearest":
        result = invert_nearest(cache.table(cfg), obs, trained_steps)
    elif name == "split-learned":
        result = invert_learned(cache.inverter(cfg), obs, trained_steps)
    elif name == "split-ciphertext":
        hidden = int(cache.pub(cfg).embed.shape[1])
        result = invert_ciphertext(cache.table(cfg), obs, hidden)
    else:  # split-labels
        result = infer_labels(cache.pub(cfg), obs, trained_steps)
    timing["attack_s"] = time.perf_counter() - clock
    cost = {**cost_of(obs), **timing}
    leakage, chance = result.pop("leakage"), result.pop("chance")
    return {
        "setting": setting_of(cfg, trained_steps),
        "leakage": leakage,
        "chance": chance,
        "cost": cost,
        **result,
    }
