"""Tests for pairwise-mask secure aggregation: correctness, dropouts, thresholds, tampering."""

import numpy as np
import pytest

from silotune.crypto import masking_wire, prg
from silotune.crypto.exceptions import AuthenticationError, CryptoError
from silotune.crypto.masking import (
    STAGE_COLLECT_MASKED_VECTORS,
    STAGE_SETUP,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    MaskingClient,
    MaskingServer,
    SecAggConfig,
)

IDS = (11, 22, 33, 44)
LENGTH = 257


def _updates(round_id: int = 0) -> dict[int, np.ndarray]:
    out = {}
    for sid in IDS:
        words = prg.expand(bytes([sid]) * 32, LENGTH, label=b"test-updates", round_id=round_id)
        out[sid] = ((words.astype(np.float64) / 2**31 - 1.0) * 0.9).astype(np.float32)
    return out


class Round:
    """Drives one protocol round through the message API, as a strategy would."""

    def __init__(self, round_id: int = 0, threshold: int = 3, ids=IDS, length=LENGTH):
        self.config = SecAggConfig(round_id, tuple(ids), threshold, length)
        self.server = MaskingServer(self.config)
        self.clients = {sid: MaskingClient(sid) for sid in ids}
        self.uploads: dict[int, bytes] = {}

    def keys(self, absent=()):
        setup = self.server.setup_message()
        for sid, c in self.clients.items():
            reply = c.handle(STAGE_SETUP, setup)
            if sid not in absent:
                self.server.handle(STAGE_SETUP, reply)
        broadcast = self.server.key_broadcast()
        self.bundles = {}
        for sid, c in self.clients.items():
            if sid in absent:
                continue
            self.bundles[sid] = c.handle(STAGE_SHARE_KEYS, broadcast)
            self.server.handle(STAGE_SHARE_KEYS, self.bundles[sid], sender=sid)

    def upload(self, updates, skip=()):
        for sid, c in self.clients.items():
            if sid in skip or sid not in self.bundles:
                continue
            routed = self.server.bundles_for(sid)
            self.uploads[sid] = c.handle(STAGE_COLLECT_MASKED_VECTORS, routed, update=updates[sid])
            self.server.handle(STAGE_COLLECT_MASKED_VECTORS, self.uploads[sid])

    def unmask(self, silent=()):
        request = self.server.unmask_request()
        for sid in self.uploads:
            if sid not in silent:
                self.server.handle(STAGE_UNMASK, self.clients[sid].handle(STAGE_UNMASK, request))
        return self.server.aggregate()


def _plain_sum(updates, ids):
    return np.sum([updates[s].astype(np.float64) for s in ids], axis=0)


def _tolerance(config: SecAggConfig, n_terms: int) -> float:
    return config.codec.sum_tolerance(n_terms) + 1e-6  # plus float32 output rounding


def test_four_silos_sum_equals_plain_sum():
    r, ups = Round(), _updates()
    r.keys()
    r.upload(ups)
    total = r.unmask()
    assert total.dtype == np.float32 and total.shape == (LENGTH,)
    assert np.abs(total - _plain_sum(ups, IDS)).max() <= _tolerance(r.config, 4)


def test_weighted_fedavg_is_the_sum_of_pre_weighted_updates():
    r, ups = Round(), _updates()
    weights = {11: 0.1, 22: 0.2, 33: 0.3, 44: 0.4}
    weighted = {s: (ups[s] * weights[s]).astype(np.float32) for s in IDS}
    r.keys()
    r.upload(weighted)
    expected = sum(ups[s].astype(np.float64) * weights[s] for s in IDS)
    assert np.abs(r.unmask() - expected).max() <= 1e-6


def test_single_upload_is_masked():
    r, ups = Round(), _updates()
    r.keys()
    r.upload(ups)
    raw = np.frombuffer(r.uploads[11][30:], dtype="<u4").astype(np.uint32)
    unmasked_guess = r.config.codec.decode_sum(raw)
    # A masked upload decodes to noise spread over the whole range, not to the update.
    assert np.abs(unmasked_guess - ups[11]).mean() > 0.1 * r.config.clip * len(IDS)


def test_silo_drops_after_uploading_is_still_counted():
    r, ups = Round(), _updates()
    r.keys()
    r.upload(ups)
    total = r.unmask(silent={44})  # 44 uploaded, then vanished before revealing shares
    assert np.abs(total - _plain_sum(ups, IDS)).max() <= _tolerance(r.config, 4)


def test_silo_drops_before_uploading_has_its_pairwise_masks_removed():
    r, ups = Round(), _updates()
    r.keys()
    r.upload(ups, skip={22})
    request_total = r.unmask()
    survivors = [s for s in IDS if s != 22]
    assert np.abs(request_total - _plain_sum(ups, survivors)).max() <= _tolerance(r.config, 3)


def test_silo_absent_from_key_sharing_is_ignored():
    r, ups = Round(), _updates()
    r.keys(absent={33})
    r.upload(ups)
    survivors = [s for s in IDS if s != 33]
    assert np.abs(r.unmask() - _plain_sum(ups, survivors)).max() <= _tolerance(r.config, 3)


def test_fewer_survivors_than_threshold_raises():
    r, ups = Round(), _updates()
    r.keys()
    r.upload(ups, skip={11, 22})
    with pytest.raises(
        CryptoError, match="Only 2 silos uploaded masked vectors; the threshold is 3"
    ):
        r.server.unmask_request()


def test_fewer_reveals_than_threshold_raises():
    r, ups = Round(), _updates()
    r.keys()
    r.upload(ups)
    with pytest.raises(CryptoError, match="Only 2 silos revealed shares; need 3"):
        r.unmask(silent={11, 22})


def test_masks_are_fresh_every_round():
    ups = _updates()
    uploads, totals = [], []
    for round_id in (0, 0, 1):
        r = Round(round_id=round_id)
        r.keys()
        r.upload(ups)
        uploads.append(r.uploads[11][30:])
        totals.append(r.unmask())
    assert uploads[0] != uploads[1] and uploads[1] != uploads[2]
    for total in totals:
        assert np.abs(total - _plain_sum(ups, IDS)).max() <= _tolerance(r.config, 4)


def test_client_refuses_to_reveal_both_shares_of_one_silo():
    r, ups = Round(), _updates()
    r.keys()
    r.upload(ups)
    # A malicious server names silo 22 both survivor and dropped.
    body = masking_wire.pack_ids([11, 22, 33]) + masking_wire.pack_ids([22])
    evil = masking_wire.pack_message(masking_wire.KIND_UNMASK, 0, 0, body)
    with pytest.raises(CryptoError, match="Refusing to reveal both shares of silos \\[22\\]"):
        r.clients[11].handle(STAGE_UNMASK, evil)


def test_client_answers_unmask_only_once():
    r, ups = Round(), _updates()
    r.keys()
    r.upload(ups)
    request = r.server.unmask_request()
    r.clients[11].handle(STAGE_UNMASK, request)
    with pytest.raises(ValueError, match="must follow"):
        r.clients[11].handle(STAGE_UNMASK, request)


def test_tampered_share_in_reveal_is_detected():
    r, ups = Round(threshold=4), _updates()
    r.keys()
    r.upload(ups)
    request = r.server.unmask_request()
    for sid in IDS:
        reveal = bytearray(r.clients[sid].handle(STAGE_UNMASK, request))
        if sid == 33:
            reveal[-5] ^= 0x01  # inside the y value of the last share
        r.server.handle(STAGE_UNMASK, bytes(reveal))
    with pytest.raises(AuthenticationError, match="inconsistent"):
        r.server.aggregate()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b[:10], "truncated"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:30] + b[31:], "exactly 257 values"),
        (lambda b: b + b"\x00", "exactly 257 values"),
    ],
)
def test_garbage_upload_bytes_raise(mutate, match):
    r, ups = Round(), _updates()
    r.keys()
    routed = r.server.bundles_for(11)
    upload = r.clients[11].handle(STAGE_COLLECT_MASKED_VECTORS, routed, update=ups[11])
    with pytest.raises(CryptoError, match=match):
        r.server.handle(STAGE_COLLECT_MASKED_VECTORS, mutate(upload))


def test_garbage_bundle_bytes_raise():
    r, ups = Round(), _updates()
    r.keys()
    routed = r.server.bundles_for(11)
    routed[22] = routed[22][:-3]
    with pytest.raises(CryptoError, match="bad length"):
        r.clients[11].handle(STAGE_COLLECT_MASKED_VECTORS, routed, update=ups[11])


def test_bundle_addressed_to_another_silo_is_rejected():
    r, ups = Round(), _updates()
    r.keys()
    routed = r.server.bundles_for(11)
    routed[22] = r.server.bundles_for(33)[22]
    with pytest.raises(AuthenticationError, match="is for silo 33"):
        r.clients[11].handle(STAGE_COLLECT_MASKED_VECTORS, routed, update=ups[11])


def test_upload_from_wrong_round_is_rejected():
    r, ups = Round(round_id=1), _updates()
    other = Round(round_id=2)
    other.keys()
    other.upload(ups)
    r.keys()
    r.server.bundles_for(11)
    with pytest.raises(CryptoError, match="round 2, expected round 1"):
        r.server.handle(STAGE_COLLECT_MASKED_VECTORS, other.uploads[11])


def test_unknown_stage_raises():
    r = Round()
    with pytest.raises(ValueError, match="Unknown stage: 'fit'"):
        r.server.handle("fit", b"")
    with pytest.raises(ValueError, match="Unknown stage: 'fit'"):
        r.clients[11].handle("fit", b"")


def test_stages_out_of_order_raise():
    client = MaskingClient(11)
    with pytest.raises(ValueError, match="must follow 'setup'"):
        client.handle(STAGE_SHARE_KEYS, b"")


def test_wrong_update_length_raises():
    r = Round()
    r.keys()
    with pytest.raises(ValueError, match="update has 3 values, config says 257"):
        r.clients[11].handle(
            STAGE_COLLECT_MASKED_VECTORS, r.server.bundles_for(11), update=np.zeros(3)
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 2}, "threshold must be an int in \\[3, 4\\]"),
        ({"silo_ids": (1,)}, "2 to 255 distinct"),
        ({"silo_ids": (1, 1, 2, 3)}, "distinct"),
        ({"vector_length": 0}, "vector_length"),
        ({"clip": -1.0}, "clip"),
    ],
)
def test_bad_config_raises(kwargs, match):
    args = {"round_id": 0, "silo_ids": IDS, "threshold": 3, "vector_length": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        SecAggConfig(**args)


def test_config_round_trips_and_rejects_garbage():
    config = SecAggConfig(5, (3, 1, 2), 2, 10, clip=0.5)
    assert config.silo_ids == (1, 2, 3)
    assert SecAggConfig.from_bytes(config.to_bytes()) == config
    with pytest.raises(ValueError, match="JSON"):
        SecAggConfig.from_bytes(b"\xff\x00")
    with pytest.raises(ValueError, match="keys"):
        SecAggConfig.from_bytes(b'{"version": 1}')
