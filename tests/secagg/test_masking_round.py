"""Authenticated masking rounds: honest runs equal weighted FedAvg; every attack is refused.

Each attack test plays an active coordinator (rewrites what it sends each silo) or a malicious
silo (rewrites what it answers) against real silos and the real driver, and asserts both that the
attack is detected with a clear error and that nothing that could unmask a silo was revealed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import numpy as np
import pytest

from silotune.crypto import box, statements
from silotune.crypto.masking_wire import KIND_UNMASK, pack_ids, pack_message
from silotune.secagg import wire
from silotune.secagg.masking_common import (
    ADVERTISE,
    CHECK,
    MASKED_INPUT,
    PURPOSE_ADVERT,
    SHARE_KEYS,
    UNMASK,
)
from silotune.secagg.masking_driver import MaskingDriver, RoundFailed
from silotune.secagg.masking_silo import ProtocolViolation
from silotune.secagg.policy import PolicyError
from tests.secagg.harness import CLIP, Federation, Run, fedavg, updates

EXAMPLES = [100, 250, 50, 400]
TOL = 4 * 0.5 * CLIP / ((2**31 - 1) // 4) * 4  # a few quantisation steps of the 4-silo codec


def edit(message: bytes, stage: str, change) -> bytes:
    """Rewrite the JSON header of a stage message (as an active coordinator or silo would)."""
    reader, payload = wire.unpack(message, stage, "test")
    doc = copy.deepcopy(dict(reader.doc))
    doc.pop("stage")
    change(doc)
    return wire.pack(stage, doc, payload)


def test_honest_round_equals_weighted_fedavg():
    fed = Federation(4)
    xs = updates(4)
    result = Run(fed, xs, EXAMPLES).go()
    assert result.contributors == fed.names and not result.dropped
    np.testing.assert_allclose(result.mean, fedavg(xs, EXAMPLES), atol=TOL)
    assert result.upload_bytes == 30 + 4 * 300


def test_equal_weighting_is_the_plain_mean():
    fed = Federation(3, weighting="equal")
    xs = updates(3)
    result = Run(fed, xs, EXAMPLES[:3]).go()
    np.testing.assert_allclose(result.mean, np.mean(xs, axis=0), atol=TOL)


@pytest.mark.parametrize("stage,included", [(MASKED_INPUT, False), (CHECK, True)])
def test_dropouts_before_and_after_upload(stage, included):
    fed = Federation(4)
    xs = updates(4)
    result = Run(fed, xs, EXAMPLES, absent={"silo-3": stage}).go()
    kept = [0, 1, 2, 3] if included else [0, 1, 2]
    np.testing.assert_allclose(
        result.mean, fedavg([xs[i] for i in kept], [EXAMPLES[i] for i in kept]), atol=TOL
    )
    assert ("silo-3" in result.contributors) == included


# ---------------------------------------------------------------- an active coordinator


def test_substituted_mask_key_is_detected_before_any_bundle_is_sent():
    """Issue 10, finding 1: show each silo a broadcast whose victim key is the coordinator's."""
    fed = Federation(3)
    own = box.new_transport_key()  # the coordinator's own key pair

    def swap(stage, member, message):
        if stage == SHARE_KEYS and member != "silo-0":
            return edit(
                message,
                stage,
                lambda d: d["adverts"]["1"].update(mask_pk=box.public_bytes(own).hex()),
            )
        return message

    run = Run(fed, updates(3), EXAMPLES[:3], tamper=swap)
    with pytest.raises(RoundFailed, match="only 1 silos shared keys"):
        run.go()
    for name in ("silo-1", "silo-2"):
        assert isinstance(run.errors[name], ProtocolViolation)
        assert "key substitution detected" in str(run.errors[name])
        assert "silo 1 ('silo-0')" in str(run.errors[name])
    assert MASKED_INPUT not in run.seen  # no masked vector left any silo


def test_changed_example_count_in_a_broadcast_is_detected():
    """A coordinator that lies about a peer's weight (to weigh one silo up) is caught."""
    fed = Federation(3)

    def inflate(stage, member, message):
        if stage == SHARE_KEYS:
            return edit(message, stage, lambda d: d["adverts"]["2"].update(examples=1))
        return message

    run = Run(fed, updates(3), EXAMPLES[:3], tamper=inflate)
    with pytest.raises(RoundFailed):
        run.go()
    assert set(run.errors) == set(fed.names)
    assert all("substitut" in str(e) for e in run.errors.values())


def test_different_survivor_sets_are_detected_before_any_share_is_revealed():
    """Tell silo-0 that silo-2 dropped and the others that it survived (to get both shares)."""
    fed = Federation(4)
    driver = fed.driver(enrollment=None)  # a cheating coordinator checks nothing it forwards
    real: dict[str, bytes] = {}

    def split_views(stage, member, message):
        if stage == CHECK:
            real[member] = message
            if member == "silo-0":
                forged = pack_message(KIND_UNMASK, 1, 0, pack_ids([1, 2, 4]) + pack_ids([3]))
                return wire.pack(CHECK, {"request": forged.hex()})
        return message

    run = Run(fed, updates(4), EXAMPLES, tamper=split_views)
    with pytest.raises(RoundFailed, match="revealed"):
        run.go(driver)
    assert UNMASK not in run.seen  # not one share left any silo
    assert set(run.errors) == set(fed.names)
    detected = [e for e in run.errors.values() if isinstance(e, ProtocolViolation)]
    assert detected
    assert any("inconsistent views" in str(e) and "survivors" in str(e) for e in detected)


def test_forwarding_a_view_signature_from_another_view_is_refused():
    """The coordinator cannot make a silo reveal with signatures over a view it did not see."""
    fed = Federation(3)
    run_a = Run(fed, updates(3), EXAMPLES[:3])
    run_a.go()
    stolen = run_a.seen[CHECK]  # real signatures, but of round 1

    def replay(stage, member, message):
        if stage == UNMASK:
            views = {
                str(i + 1): {
                    "signature": wire.unpack(stolen[name], CHECK, "t")[0].doc["signature"],
                    "summary": None,
                }
                for i, name in enumerate(fed.names)
            }
            return wire.pack(UNMASK, {"views": views})
        return message

    run_b = Run(fed, updates(3, seed=9), EXAMPLES[:3], tamper=replay)
    with pytest.raises(RoundFailed):
        run_b.go(fed.driver(round_id=2))
    assert UNMASK not in run_b.seen
    assert all("inconsistent views" in str(e) for e in run_b.errors.values())


def test_replayed_round_is_refused_by_every_silo():
    """A second masked upload for one round could unmask a silo (sum over a different set)."""
    fed = Federation(3)
    Run(fed, updates(3), EXAMPLES[:3]).go(fed.driver(round_id=5))
    run = Run(fed, updates(3), EXAMPLES[:3])
    with pytest.raises(RoundFailed):
        run.go(fed.driver(round_id=5))
    assert all("replays round 5" in str(e) for e in run.errors.values())


def test_advert_replayed_from_another_round_is_detected():
    fed = Federation(3)
    first = Run(fed, updates(3), EXAMPLES[:3])
    first.go(fed.driver(round_id=1))
    old = wire.unpack(first.seen[ADVERTISE]["silo-2"], ADVERTISE, "t")[0].doc["advert"]

    def replay(stage, member, message):
        if stage == SHARE_KEYS and member != "silo-2":
            return edit(message, stage, lambda d: d["adverts"].update({"3": old}))
        return message

    run = Run(fed, updates(3), EXAMPLES[:3], tamper=replay)
    with pytest.raises(RoundFailed):
        run.go(fed.driver(round_id=2))
    assert "key substitution detected" in str(run.errors["silo-0"])


def test_a_swapped_share_bundle_is_detected_by_its_recipient():
    fed = Federation(3)

    def swap(stage, member, message):
        if stage == MASKED_INPUT and member == "silo-0":

            def change(d):
                d["bundles"]["2"]["sealed"] = d["bundles"]["3"]["sealed"]

            return edit(message, stage, change)
        return message

    run = Run(fed, updates(3), EXAMPLES[:3], tamper=swap)
    result = run.go()
    assert "coordinator changed or swapped it" in str(run.errors["silo-0"])
    assert "silo-0" not in result.contributors


def test_a_silo_does_not_join_a_round_below_its_own_min_silos_or_with_another_clip():
    fed = Federation(3, min_silos=3)
    d = MaskingDriver(fed.job, 1, fed.names, 300, 1.0, enrollment=fed.enrollment)
    run = Run(fed, updates(3), EXAMPLES[:3])
    with pytest.raises(RoundFailed):
        run.go(d)
    assert all(isinstance(e, PolicyError) for e in run.errors.values())
    assert "clip 1.0" in str(run.errors["silo-0"])


# ---------------------------------------------------------------- a malicious silo


def test_all_zero_mask_key_drops_its_sender_and_the_round_goes_on():
    """Issue 10, finding 4: a low-order key used to stop every honest silo's upload."""
    fed = Federation(4)
    xs = updates(4)

    def zero(stage, member, reply):
        if stage == ADVERTISE and member == "silo-3":
            return edit(reply, stage, lambda d: d["advert"].update(mask_pk="00" * 32))
        return reply

    result = Run(fed, xs, EXAMPLES, corrupt=zero).go()
    assert "low-order" in result.dropped["silo-3"]
    np.testing.assert_allclose(result.mean, fedavg(xs[:3], EXAMPLES[:3]), atol=TOL)


def test_a_zero_key_the_coordinator_lets_through_is_refused_by_the_silos():
    fed = Federation(3)

    def zero(stage, member, message):
        if stage == SHARE_KEYS:
            return edit(message, stage, lambda d: d["adverts"]["3"].update(transport_pk="00" * 32))
        return message

    run = Run(fed, updates(3), EXAMPLES[:3], tamper=zero)
    with pytest.raises(RoundFailed):
        run.go()
    assert all("low-order" in str(e) for e in run.errors.values())


def test_garbage_bundle_evicts_its_sender_not_its_recipient():
    """Issue 10, finding 5: a signed garbage bundle used to get its honest recipient dropped."""
    fed = Federation(5)  # threshold 3: silo-4's key is still rebuilt without silo-0's share
    xs = updates(5)
    examples = EXAMPLES + [80]

    def bad_bundle(stage, member, reply):
        if stage == SHARE_KEYS and member == "silo-4":
            # silo-3 seals random bytes for silo-0 and signs them properly (a malicious silo).
            silo = run.silos["silo-4"]
            sealed = box.seal(
                silo._transport,
                silo.adverts[1].transport_pk,
                b"secagg-masking-bundle|" + fed.job,
                1,
                b"garbage",
            )

            def change(d):
                d["bundles"]["1"] = {
                    "sealed": sealed.hex(),
                    "signature": silo._sign_bundle(1, sealed),
                }

            return edit(reply, stage, change)
        return reply

    run = Run(fed, xs, examples, corrupt=bad_bundle)
    result = run.go()
    assert "silo-0" in result.contributors and "silo-4" not in result.contributors
    assert "does not open" in result.dropped["silo-4"]
    np.testing.assert_allclose(result.mean, fedavg(xs[:4], EXAMPLES), atol=TOL)


def test_unsigned_bundle_drops_its_sender_at_the_coordinator():
    fed = Federation(4)
    xs = updates(4)

    def unsigned(stage, member, reply):
        if stage == SHARE_KEYS and member == "silo-2":
            return edit(reply, stage, lambda d: d["bundles"]["1"].update(signature=""))
        return reply

    result = Run(fed, xs, EXAMPLES, corrupt=unsigned).go()
    assert "signature" in result.dropped["silo-2"]
    kept = [0, 1, 3]
    np.testing.assert_allclose(
        result.mean, fedavg([xs[i] for i in kept], [EXAMPLES[i] for i in kept]), atol=TOL
    )


def test_huge_example_count_drops_its_sender():
    """Issue 10, finding 5: a self-reported examples=10**12 took over the weighting."""
    fed = Federation(3, max_examples=10_000)
    xs = updates(3)
    run = Run(fed, xs, [100, 200, 300])

    def huge(stage, member, reply):
        if stage == ADVERTISE and member == "silo-1":
            silo = run.silos[member]
            advert = replace(silo.adverts[silo.sid], examples=10**12)
            signature = statements.sign(
                fed.keys[member], PURPOSE_ADVERT, fed.job, 1, advert.signed_fields(silo.setup)
            )
            return wire.pack(ADVERTISE, {"advert": replace(advert, signature=signature).fields()})
        return reply

    run.corrupt = huge
    result = run.go()
    assert "allowed 1..10000" in result.dropped["silo-1"]
    np.testing.assert_allclose(result.mean, fedavg([xs[0], xs[2]], [100, 300]), atol=TOL)


def test_an_honest_silo_never_claims_more_than_its_policy_allows():
    fed = Federation(3, max_examples=10_000)
    run = Run(fed, updates(3), [100, 10**12, 100])
    run.go()
    assert "allowed 1..10000" in str(run.errors["silo-1"])


@pytest.mark.parametrize(
    "stage,change,field",
    [
        (ADVERTISE, lambda d: d.pop("advert"), "advert"),
        (SHARE_KEYS, lambda d: d.pop("bundles"), "bundles"),
        (MASKED_INPUT, lambda d: d.pop("accused"), "accused"),
        (CHECK, lambda d: d.pop("signature"), "signature"),
    ],
)
def test_a_reply_missing_a_field_drops_that_silo_and_names_the_field(stage, change, field, caplog):
    fed = Federation(4)
    xs = updates(4)

    def missing(s, member, reply):
        return edit(reply, s, change) if s == stage and member == "silo-1" else reply

    with caplog.at_level(logging.WARNING):
        result = Run(fed, xs, EXAMPLES, corrupt=missing).go()
    assert "silo silo-1 " in caplog.text and f"'{field}'" in caplog.text
    assert (stage == CHECK) == ("silo-1" in result.contributors)
    kept = [0, 2, 3] if stage != CHECK else [0, 1, 2, 3]  # after upload it stays in the sum
    np.testing.assert_allclose(
        result.mean, fedavg([xs[i] for i in kept], [EXAMPLES[i] for i in kept]), atol=TOL
    )


@pytest.mark.parametrize("stage", [ADVERTISE, SHARE_KEYS, MASKED_INPUT, CHECK, UNMASK])
def test_garbage_bytes_at_any_stage_never_end_the_round(stage):
    fed = Federation(4)
    result = Run(
        fed,
        updates(4),
        EXAMPLES,
        corrupt=lambda s, m, r: b"\x00garbage" if (s, m) == (stage, "silo-2") else r,
    ).go()
    if stage in (ADVERTISE, SHARE_KEYS, MASKED_INPUT):
        assert "silo-2" in result.dropped
    assert len(result.contributors) >= 3


def test_nan_update_never_leaves_the_silo():
    fed = Federation(3)
    xs = updates(3)
    xs[0][5] = np.nan
    run = Run(fed, xs, EXAMPLES[:3])
    result = run.go()
    assert "NaN" in str(run.errors["silo-0"]) and "silo-0" not in result.contributors
