"""BASELINE ONLY: FedShield-LLM's CKKS aggregation (arXiv 2506.05640), reproduced for benchmarks.

Not secure aggregation: one context holding the secret key encrypts, aggregates and decrypts, as
FedShield-LLM's code does. ``silotune bench secagg`` compares silotune's HE aggregation with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tenseal as ts
from numpy.typing import ArrayLike, NDArray

__all__ = ["baseline_context", "encrypt", "aggregate", "decrypt"]


def baseline_context() -> ts.Context:
    """BASELINE: FedShield-LLM's CKKS context (N=8192, [60,40,40,60], 2**40, secret key inside).

    FedShield also generates Galois keys; they are not needed for sums and are skipped here.
    """
    context = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60]
    )
    context.global_scale = 2**40
    return context


def encrypt(context: ts.Context, tensors: Sequence[ArrayLike]) -> list[bytes]:
    """BASELINE: one CKKS vector per flattened tensor, public-key encryption, no weighting."""
    return [
        ts.ckks_vector(context, np.asarray(t).reshape(-1).tolist()).serialize() for t in tensors
    ]


def aggregate(context: ts.Context, per_silo: Sequence[Sequence[bytes]]) -> list[bytes]:
    """BASELINE: unweighted mean, ``sum of ciphertexts * (1 / n)``, tensor by tensor."""
    n = len(per_silo)
    out = []
    for i in range(len(per_silo[0])):
        total = ts.ckks_vector_from(context, per_silo[0][i])
        for silo in per_silo[1:]:
            total += ts.ckks_vector_from(context, silo[i])
        out.append((total * (1.0 / n)).serialize())
    return out


def decrypt(context: ts.Context, ciphertexts: Sequence[bytes]) -> list[NDArray[np.float32]]:
    """BASELINE: decrypt each aggregated tensor with the (server-held) secret key."""
    return [
        np.asarray(ts.ckks_vector_from(context, c).decrypt(), dtype=np.float32) for c in ciphertexts
    ]
