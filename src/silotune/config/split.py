"""The `split:` section of a job (mode: split)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    secure_averaging: Literal["none", "masking"] = Field(
        "masking",
        description="how silo adapters are averaged: masking = pairwise-mask secure aggregation "
        "(the coordinator learns only the average), none = sent to the coordinator in clear",
    )
    secagg_clip: float = Field(
        16.0,
        gt=0,
        description="masking: bound on each pre-weighted adapter value (a larger value raises a "
        "clear error); smaller = finer fixed-point quantisation",
    )
    activation_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of activations and gradients on the wire"
    )
    noise_sigma: float = Field(0.0, ge=0, description="Gaussian noise std on activations/gradients")
    address: str = Field("127.0.0.1:50051", description="trunk server address (serve/join)")
    trunk_adapter: bool = Field(
        True,
        description="the coordinator trains LoRA on the trunk blocks (else the trunk is frozen)",
    )
    trunk_in_enclave: bool = Field(
        False,
        description="run the trunk inside the coordinator's (attested) enclave; silos verify its "
        "quote and key their channel to it, the host relays only ciphertext",
    )
    keys_dir: Path | None = Field(
        None,
        description="identity keys (serve/join): coordinator.key + enrollment.json on the "
        "coordinator, <silo_name>.key + coordinator.pub on a silo; `train` makes throwaway ones",
    )
    tls_dir: Path | None = Field(
        None,
        description="TLS files (serve/join): ca.pem, server.pem, server.key on the coordinator, "
        "ca.pem on a silo; `train` makes throwaway ones",
    )
    silo_name: str = Field("silo-0", description="this silo's enrolled name (join)")
    timeout_s: float = Field(
        300.0, gt=0, description="seconds to wait for a peer's frame or for the other silos"
    )

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port with a port from 1 to 65535")
        return value
