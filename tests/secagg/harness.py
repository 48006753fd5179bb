"""An in-memory carrier for secure-aggregation rounds, with hooks for an adversarial coordinator.

Silos are real :class:`MaskingSilo` objects with real Ed25519 identities and an enrollment; the
coordinator is the real :class:`MaskingDriver`. ``tamper(stage, member, message) -> message`` lets
a test rewrite what the coordinator sends each silo (an active coordinator); ``corrupt(stage,
member, reply) -> reply`` rewrites what a silo answers (a malicious silo). Every silo's error is
kept, so a test can assert what each honest silo detected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from silotune.crypto import prg
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.secagg.masking_common import MASKED_INPUT, STAGES
from silotune.secagg.masking_driver import MaskingDriver, run_round
from silotune.secagg.masking_silo import MaskingSilo, new_job_id
from silotune.secagg.policy import SiloPolicy

CLIP = 0.25
LENGTH = 300


def updates(n: int, length: int = LENGTH, seed: int = 0) -> list[np.ndarray]:
    out = []
    for k in range(n):
        words = prg.expand(bytes([k + 1 + seed]) * 32, length, label=b"test/secagg")
        out.append(((words.astype(np.float64) / 2**31 - 1.0) * 0.05).astype(np.float32))
    return out


def fedavg(xs: list[np.ndarray], examples: list[int]) -> np.ndarray:
    total = sum(n * x.astype(np.float64) for x, n in zip(xs, examples, strict=True))
    return total / sum(examples)


@dataclass
class Federation:
    """``n`` enrolled silos named silo-0.. with their own policies and round histories."""

    n: int
    min_silos: int = 2
    weighting: str = "examples"
    max_examples: int = 1_000_000
    keys: dict[str, IdentityKey] = field(init=False)
    enrollment: Enrollment = field(init=False)
    histories: dict[str, dict[str, int]] = field(init=False)
    job: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.keys = {f"silo-{i}": IdentityKey.generate() for i in range(self.n)}
        self.enrollment = Enrollment({k: v.public for k, v in self.keys.items()})
        self.histories = {name: {} for name in self.keys}
        self.job = new_job_id()

    @property
    def names(self) -> list[str]:
        return sorted(self.keys)

    def policy(self) -> SiloPolicy:
        return SiloPolicy(
            "masking", self.min_silos, CLIP, self.weighting, self.max_examples, authenticated=True
        )

    def silo(self, name: str) -> MaskingSilo:
        return MaskingSilo(
            self.policy(), self.keys[name], self.enrollment, name, self.histories[name]
        )

    def driver(self, round_id: int = 1, length: int = LENGTH, **kwargs) -> MaskingDriver[str]:
        args = {
            "weighting": self.weighting,
            "max_examples": self.max_examples,
            "min_silos": self.min_silos,
            "enrollment": self.enrollment,
        }
        args.update(kwargs)
        return MaskingDriver(self.job, round_id, self.names, length, CLIP, **args)


Hook = Callable[[str, str, bytes], bytes | None]


@dataclass
class Run:
    """One round over the in-memory carrier; ``errors[name]`` is what each silo raised."""

    fed: Federation
    xs: list[np.ndarray]
    examples: list[int]
    tamper: Hook | None = None  # coordinator -> silo (None drops the message)
    corrupt: Hook | None = None  # silo -> coordinator (None: no reply)
    absent: dict[str, str] = field(default_factory=dict)  # silo -> first stage it misses
    errors: dict[str, Exception] = field(default_factory=dict)
    seen: dict[str, dict[str, bytes]] = field(default_factory=dict)  # stage -> member -> reply

    def __post_init__(self) -> None:
        self.silos = {name: self.fed.silo(name) for name in self.fed.names}
        self.index = {name: i for i, name in enumerate(self.fed.names)}

    def exchange(self, stage: str, messages: dict[str, bytes]):
        replies, failed = {}, {}
        for member, message in messages.items():
            if member in self.errors:
                failed[member] = "silo stopped"
                continue
            gone = self.absent.get(member)
            if gone is not None and STAGES.index(stage) >= STAGES.index(gone):
                failed[member] = "vanished"
                continue
            if self.tamper is not None:
                message = self.tamper(stage, member, message)
                if message is None:
                    continue
            i = self.index[member]
            try:
                reply = self.silos[member].handle(
                    stage,
                    message,
                    examples=self.examples[i],
                    update=self.xs[i] if stage == MASKED_INPUT else None,
                )
            except Exception as exc:  # noqa: BLE001 - the test inspects what the silo raised
                self.errors[member] = exc
                failed[member] = f"{type(exc).__name__}: {exc}"
                continue
            if self.corrupt is not None:
                reply = self.corrupt(stage, member, reply)
                if reply is None:
                    continue
            self.seen.setdefault(stage, {})[member] = reply
            replies[member] = reply
        return replies, failed

    def go(self, driver: MaskingDriver[str] | None = None):
        return run_round(driver or self.fed.driver(), self.exchange)
