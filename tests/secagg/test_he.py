"""HE decryption guard: an active coordinator cannot get one silo's update decrypted.

Each test plays the coordinator against a real key holder's :class:`DecryptionGuard` (real
TenSEAL keys, real Ed25519 identities): padding one ciphertext with encryptions of zero, asking
twice, replaying a round, forging weights, submitting its own ciphertext. Every attempt raises
:class:`ProtocolViolation` before anything is decrypted, and the honest request gives the
weighted sum.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from silotune.crypto import he
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.secagg.he_guard import (
    Contribution,
    DecryptionGuard,
    pack_contributions,
    unpack_contributions,
    verify_sum,
)
from silotune.secagg.masking_silo import ProtocolViolation, new_job_id
from silotune.secagg.policy import SiloPolicy
from tests.secagg.harness import fedavg, updates

CLIP = 0.25
EXAMPLES = [100, 300, 200]


@pytest.fixture(scope="module")
def world():
    keys = he.HeKeys.generate(he.HeParams(clip=CLIP))
    ids = {f"silo-{i}": IdentityKey.generate() for i in range(3)}
    enrollment = Enrollment({n: k.public for n, k in ids.items()})
    return keys, ids, enrollment


def contributions(world, job, round_id=1, examples=EXAMPLES, xs=None):
    keys, ids, _ = world
    xs = xs if xs is not None else updates(3)
    total = sum(examples)
    out = []
    for (name, key), x, n in zip(sorted(ids.items()), xs, examples, strict=True):
        ct = he.encrypt_update(keys, x, n / total)
        out.append(Contribution.sign(key, job, round_id, name, ct, n, n / total))
    return out


def guard(world, min_silos=2, history=None):
    policy = SiloPolicy("he", min_silos, CLIP, "examples", 1_000_000)
    return DecryptionGuard(policy, world[2], {} if history is None else history)


def test_honest_request_decrypts_the_weighted_sum_and_signs_it(world):
    keys, ids, enrollment = world
    job, xs = new_job_id(), updates(3)
    request = pack_contributions(job, 1, contributions(world, job, xs=xs))
    values, sig, names = guard(world).decrypt(keys, request, xs[0].size, ids["silo-0"], "silo-0")
    tol = he.HeParams(clip=CLIP).codec.sum_tolerance(3)
    assert np.abs(values - fedavg(xs, EXAMPLES)).max() <= tol + 1e-7
    verify_sum(enrollment, "silo-0", sig, job, 1, values, names)
    with pytest.raises(Exception, match="does not verify"):
        verify_sum(enrollment, "silo-0", sig, job, 1, values * 10, names)


def test_a_single_ciphertext_padded_with_zeros_is_refused(world):
    """Issue 10, finding 2: one silo's ciphertext sent as a '3-term aggregate'."""
    keys, ids, _ = world
    job = new_job_id()
    items = contributions(world, job)
    zero = he.encrypt_update(keys, np.zeros(300), 0.5)
    padded = he.sum_ciphertexts(keys, [items[1].ciphertext, zero, zero])
    forged = [replace(items[1], ciphertext=padded)]
    with pytest.raises(ProtocolViolation, match="min_silos is 2"):
        guard(world).decrypt(keys, pack_contributions(job, 1, forged), 300, None, "silo-0")
    # Even listed with the others, a multi-term ciphertext (or one whose signature it breaks)
    # is refused.
    with pytest.raises(ProtocolViolation, match="several terms|does not verify"):
        request = pack_contributions(job, 1, [items[0], forged[0], items[2]])
        guard(world).decrypt(keys, request, 300, None, "silo-0")


def test_the_coordinators_own_ciphertext_is_refused(world):
    keys, ids, _ = world
    job = new_job_id()
    items = contributions(world, job)
    mine = he.encrypt_update(keys, np.zeros(300), 0.5)  # unsigned: the coordinator has no key
    forged = [items[0], replace(items[1], ciphertext=mine)]
    with pytest.raises(ProtocolViolation, match="does not verify"):
        guard(world).decrypt(keys, pack_contributions(job, 1, forged), 300, None, "silo-0")


def test_decrypting_twice_in_a_round_or_replaying_a_round_is_refused(world):
    keys, ids, _ = world
    job, history = new_job_id(), {}
    request = pack_contributions(job, 3, contributions(world, job, round_id=3))
    guard(world, history=history).decrypt(keys, request, 300, None, "silo-0")
    with pytest.raises(ProtocolViolation, match="second decryption"):
        guard(world, history=history).decrypt(keys, request, 300, None, "silo-0")
    old = pack_contributions(job, 2, contributions(world, job, round_id=2))
    with pytest.raises(ProtocolViolation, match="round 2 of this job after round 3"):
        guard(world, history=history).decrypt(keys, old, 300, None, "silo-0")


def test_a_contribution_replayed_from_another_round_is_refused(world):
    keys, _, _ = world
    job = new_job_id()
    items = contributions(world, job, round_id=1)
    with pytest.raises(ProtocolViolation, match="forged or replayed"):
        guard(world).decrypt(keys, pack_contributions(job, 2, items), 300, None, "silo-0")


def test_forged_weights_are_refused(world):
    """A coordinator that weighs the victim up (weight 1, the others tiny) is caught."""
    keys, ids, _ = world
    job = new_job_id()
    xs = updates(3)
    weights = [0.001, 0.998, 0.001]  # what the coordinator told each silo
    items = []
    for (name, key), x, n, w in zip(sorted(ids.items()), xs, EXAMPLES, weights, strict=True):
        items.append(Contribution.sign(key, job, 1, name, he.encrypt_update(keys, x, w), n, w))
    with pytest.raises(ProtocolViolation, match="inconsistent weights"):
        guard(world).decrypt(keys, pack_contributions(job, 1, items), 300, None, "silo-0")


def test_one_silo_listed_twice_or_the_same_ciphertext_twice_is_refused(world):
    keys, _, _ = world
    job = new_job_id()
    items = contributions(world, job)
    with pytest.raises(ProtocolViolation, match="appears twice"):
        guard(world).decrypt(
            keys, pack_contributions(job, 1, [items[0], items[0]]), 300, None, "silo-0"
        )


def test_an_inflated_example_count_is_refused(world):
    keys, _, _ = world
    job = new_job_id()
    items = contributions(world, job, examples=[100, 10**9, 200])
    policy = SiloPolicy("he", 2, CLIP, "examples", 10_000)
    with pytest.raises(Exception, match="allowed 1..10000"):
        DecryptionGuard(policy, world[2], {}).decrypt(
            keys, pack_contributions(job, 1, items), 300, None, "silo-0"
        )


def test_request_framing_round_trips_and_rejects_garbage(world):
    job = new_job_id()
    items = contributions(world, job)
    got_job, got_round, got = unpack_contributions(pack_contributions(job, 1, items))
    assert (got_job, got_round, got) == (job, 1, items)
    with pytest.raises(Exception, match="truncated|trailing"):
        unpack_contributions(pack_contributions(job, 1, items)[:-5])
