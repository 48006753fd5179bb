"""The FedShield-LLM baseline the secagg benchmark compares against (bench/fedshield.py)."""

import numpy as np

from silotune.bench import fedshield
from silotune.crypto import prg


def _update(k: int, length: int) -> np.ndarray:
    words = prg.expand(bytes([k + 1]) * 32, length, label=b"test-fedshield")
    return ((words.astype(np.float64) / 2**31 - 1.0) * 0.05).astype(np.float32)


def test_fedshield_baseline_reproduces_unweighted_mean():
    context = fedshield.baseline_context()
    assert context.is_private()  # the baseline's flaw: the aggregating context holds the key
    tensors = [[_update(k, 64), _update(k + 10, 32)] for k in range(3)]
    per_silo = [fedshield.encrypt(context, t) for t in tensors]
    assert len(per_silo[0][0]) > 64 * 32  # far more than 8 bytes per parameter
    out = fedshield.decrypt(context, fedshield.aggregate(context, per_silo))
    for i in range(2):
        expected = np.mean([t[i].astype(np.float64) for t in tensors], axis=0)
        np.testing.assert_allclose(out[i], expected, atol=1e-5)
