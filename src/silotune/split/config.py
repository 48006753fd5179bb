"""The `split:` section of a job (mode: split)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Strict):
    """U-shaped split: silos keep head and tail, the coordinator runs the trunk."""

    head_layers: int = Field(1, ge=0, description="blocks kept by the silo before the trunk")
    tail_layers: int = Field(1, ge=1, description="blocks kept by the silo after the trunk")
    server_mode: Literal["sequential", "client-batching", "server-hierarchical"] = Field(
        "client-batching", description="how the coordinator serves concurrent silos"
    )
    silos: int = Field(2, ge=1, description="number of silos")
    sync_every: int = Field(10, gt=0, description="average adapters across silos every E steps")
    activation_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of activations and gradients on the wire"
    )
    noise_sigma: float = Field(0.0, ge=0, description="Gaussian noise std on activations/gradients")
    address: str = Field("127.0.0.1:50051", description="trunk server address (serve/join)")
