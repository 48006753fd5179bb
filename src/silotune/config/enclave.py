"""The `enclave:` section of a job: which trusted-execution backend, and what a verifier accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EnclaveConfig(_Strict):
    """Trusted execution (used by `split.trunk_in_enclave` and `adapter.placement: enclave`)."""

    backend: Literal["simulated"] = Field(
        "simulated",
        description="enclave backend; only `simulated` exists (its own process, quotes signed "
        "by a stand-in platform key); docs/enclave.md maps the interface onto SGX/TDX/SEV-SNP",
    )
    platform_key: Path | None = Field(
        None,
        description="simulated platform (vendor) key: the private key where the enclave runs, "
        "the public key where quotes are verified; `train` makes a throwaway one",
    )
    allowed_measurements: list[str] = Field(
        default_factory=list,
        description="hex SHA-256 measurements a verifier accepts; empty = only the measurement "
        "this silotune build computes for its own enclave code and configuration",
    )
    seal_dir: Path | None = Field(
        None, description="where the enclave seals state at rest; default <output_dir>/sealed"
    )
    mask_std: float = Field(
        1.0e4,
        gt=0,
        le=1.0e6,
        description="adapter placement enclave: std of the fresh one-time Gaussian masks, as a "
        "multiple of each masked tensor's largest magnitude; above 1e6 the float64 masked "
        "matmuls start to cost float32 accuracy (docs/adapter-in-tee.md: what the REE learns)",
    )
    unblinding: Literal["offline", "online"] = Field(
        "offline",
        description="adapter placement enclave: offline = draw the masks and compute their "
        "unblinding factors (z W^T, z W) ahead of the step into a pool, each used once, so the "
        "step repeats no frozen matmul in the enclave; online = compute them in the step "
        "(docs/adapter-in-tee.md: offline unblinding)",
    )
    mask_pool_tokens: int | None = Field(
        None,
        gt=0,
        description="adapter placement enclave, unblinding offline: precomputed mask rows (one "
        "per token) kept per masked tensor site, refilled before every step and on running out; "
        "None = train.batch_size x data.max_length (one step of full-length batches)",
    )

    @field_validator("allowed_measurements")
    @classmethod
    def _hex_sha256(cls, value: list[str]) -> list[str]:
        for item in value:
            if len(item) != 64 or any(c not in "0123456789abcdef" for c in item.lower()):
                raise ValueError(f"'{item}' is not a hex SHA-256 (64 hex digits)")
        return [item.lower() for item in value]
