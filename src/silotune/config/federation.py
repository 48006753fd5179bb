"""The `federation:` section of a job (mode: federated)."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)

# HeParams.max_silos: the packed BFV fields of a sum of more updates could carry into each other.
HE_MAX_SILOS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PruningConfig(_Strict):
    """Magnitude pruning of each silo's update onto a support shared by every silo of a round.

    The pruning rate is 0 before `start_round`, rises linearly from `initial_rate` at `start_round`
    to `target_rate` at `end_round`, and stays at `target_rate` after it. Only the values on the
    round's support travel, so bytes shrink with the density (1 - rate); what is not sent stays in
    the silo's error-feedback residual and is added to its next update.
    """

    enabled: bool = Field(False, description="prune/sparsify updates")
    start_round: int = Field(1, ge=1, description="first round with pruning")
    end_round: int = Field(1, ge=1, description="round at which target_rate is reached")
    initial_rate: float = Field(0.5, ge=0.0, lt=1.0, description="fraction dropped at start_round")
    target_rate: float = Field(0.9, ge=0.0, lt=1.0, description="fraction dropped from end_round")
    support: Literal["random", "topk_prev"] = Field(
        "random",
        description="random: seeded by (job seed, round), the same on every silo; topk_prev: the "
        "largest entries of the previous round's aggregate (random in the first round)",
    )
    error_feedback: bool = Field(True, description="keep what was not sent and add it next round")

    @model_validator(mode="after")
    def _ordered(self) -> PruningConfig:
        if self.end_round < self.start_round:
            raise ValueError("pruning.end_round must be >= pruning.start_round")
        return self


class DPConfig(_Strict):
    """Per-silo differential privacy: clip each update's L2 norm, add Gaussian noise, account."""

    enabled: bool = Field(False, description="clip and noise each silo's update")
    clip_norm: float = Field(0.1, gt=0, description="L2 bound C on one silo's update per round")
    noise_multiplier: float = Field(
        1.0, gt=0, description="sigma: each silo adds N(0, (sigma*C)^2) to every coordinate"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta at which epsilon is reported")


class FederationConfig(_Strict):
    """How silos train together and how their updates are aggregated."""

    silos: int = Field(3, ge=1, description="number of silos (simulation: partitions of the data)")
    rounds: int = Field(5, gt=0, description="federated rounds")
    local_steps: int = Field(10, gt=0, description="optimizer steps per silo per round")
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of silos sampled per round")
    min_silos: int = Field(2, ge=1, description="a round fails if fewer silos report")
    strategy: Literal["fedavg", "fedprox", "fedadam"] = Field("fedavg", description="aggregation")
    proximal_mu: float = Field(
        0.01, ge=0, description="fedprox: weight mu of the (mu/2)*||w - w_global||^2 term"
    )
    local_optimizer: Literal["fresh", "persistent"] = Field(
        "fresh",
        description="fresh: a new AdamW every round; persistent: each silo keeps its AdamW "
        "moments and step across rounds (a resumed job then differs from an uninterrupted one)",
    )
    server_lr: float | None = Field(
        None,
        gt=0,
        description="server step on the averaged update; default 1.0 (fedavg, fedprox: plain "
        "averaging) or 0.01 (fedadam)",
    )
    partition: Literal["iid", "dirichlet", "domain"] = Field(
        "iid",
        description="how data is split (simulation): iid; dirichlet = label-skewed (label, or "
        "domain for task instruction); domain = whole labels/domains per silo, one each when "
        "silos equals their number",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for partition: dirichlet")
    secure_aggregation: Literal["none", "masking", "he"] = Field(
        "none",
        description="none, pairwise masking (SecAgg), or he: homomorphic aggregation (TenSEAL BFV "
        "with two fixed-point values per slot; 'ckks', its former name, is accepted)",
    )
    masking_threshold: int | None = Field(
        None, ge=2, description="masking: Shamir threshold; default a majority of the round's silos"
    )
    secagg_clip: float = Field(
        0.25,
        gt=0,
        description="masking/he: each pre-weighted update value is clipped to [-clip, clip] "
        "before fixed-point encoding (smaller = finer quantisation)",
    )
    weighting: Literal["examples", "equal"] = Field(
        "examples",
        description="how updates are weighted: examples (FedAvg by each silo's signed example "
        "count) or equal (plain mean)",
    )
    max_examples: int = Field(
        1_000_000,
        ge=1,
        description="most training examples one silo may claim; a larger claim drops that silo "
        "(it bounds any one silo's weight)",
    )
    he_decrypters: int = Field(
        2,
        ge=1,
        le=2,
        description="he: key holders that decrypt each round's sum; with 2 the coordinator "
        "compares their signed sums, so one lying decrypter is caught",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="deployment: let a silo run without identity_key/enrollment (peers' keys "
        "are then trusted as relayed; a warning every round)",
    )
    identity_key: str | None = Field(
        None,
        description="deployment: this silo's Ed25519 identity key (PEM, from silotune keygen); "
        "signs its transport key",
    )
    enrollment: str | None = Field(
        None,
        description="deployment: JSON enrollment of every silo's public identity; every key a "
        "silo uses must be signed by an enrolled silo (on the coordinator: optional, it then "
        "drops silos whose signatures fail)",
    )
    eval_every: int = Field(1, gt=0, description="evaluate the global adapter every N rounds")
    round_timeout_s: float = Field(600.0, gt=0, description="seconds to wait for silos per stage")
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    simulation: bool = Field(
        True, description="run every silo on this machine via Flower simulation"
    )

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _former_name(cls, value: object) -> object:
        if value == "ckks":  # the scheme was always BFV; the name said CKKS
            log.warning("federation.secure_aggregation: 'ckks' is deprecated; write 'he'")
            return "he"
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        # A silo needs both identity_key and enrollment (checked where they load); the
        # coordinator may name the enrollment alone, to drop badly signed silos itself.
        if self.min_silos > self.silos:
            raise ValueError(f"min_silos ({self.min_silos}) exceeds silos ({self.silos})")
        if self.secure_aggregation != "none" and self.min_silos < 2:
            raise ValueError(
                "secure aggregation needs min_silos >= 2 (a sum of one update is that update)"
            )
        if self.secure_aggregation == "he" and self.silos > HE_MAX_SILOS:
            raise ValueError(f"secure_aggregation he supports at most {HE_MAX_SILOS} silos")
        if self.masking_threshold is not None and self.masking_threshold > self.min_silos:
            raise ValueError(
                "masking_threshold must be <= min_silos, or a round could complete without "
                "enough shares to unmask it"
            )
        return self

    @property
    def effective_server_lr(self) -> float:
        """The server step size after applying the strategy's default."""
        if self.server_lr is not None:
            return self.server_lr
        return 0.01 if self.strategy == "fedadam" else 1.0
