"""The `federation:` section of a job (mode: federated)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FederationConfig(_Strict):
    """How silos train together and how their updates are aggregated."""

    silos: int = Field(3, ge=1, description="number of silos (simulation: partitions of the data)")
    rounds: int = Field(5, gt=0, description="federated rounds")
    local_steps: int = Field(10, gt=0, description="optimizer steps per silo per round")
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of silos sampled per round")
    min_silos: int = Field(2, ge=1, description="a round fails if fewer silos report")
    strategy: Literal["fedavg", "fedprox", "fedadam"] = Field("fedavg", description="aggregation")
    partition: Literal["iid", "dirichlet"] = Field("iid", description="how data is split (simulation)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for partition: dirichlet")
    secure_aggregation: Literal["none", "masking", "ckks"] = Field(
        "none", description="none, pairwise masking (SecAgg), or CKKS homomorphic aggregation"
    )
    simulation: bool = Field(True, description="run every silo on this machine via Flower simulation")
