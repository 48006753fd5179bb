"""Pairwise-mask secure aggregation (Bonawitz et al. style) with dropout recovery, uint32 uploads.

Protocol, one round, silos ``i`` with ids from :class:`SecAggConfig` (``U1 >= U2 >= U3``):

1. ``STAGE_SETUP``: the server sends the config; each silo draws a fresh X25519 mask key pair
   ``(sk_i, pk_i)`` and a fresh 32-byte self-mask seed ``b_i`` and answers with ``pk_i``.
2. ``STAGE_SHARE_KEYS``: the server broadcasts every ``pk`` (senders form ``U1``); each silo splits
   ``b_i`` and ``sk_i`` into Shamir shares (threshold ``t``) and returns one bundle per peer.
   **The caller must encrypt each bundle end-to-end for its recipient** (AEAD channel) before
   handing it to the server; the server only routes them. Silos whose bundles arrive form ``U2``.
3. ``STAGE_COLLECT_MASKED_VECTORS``: silo ``i`` uploads, mod 2**32,
   ``encode(x_i) + PRG(b_i) + sum_{j in U2, j > i} PRG(s_ij) - sum_{j in U2, j < i} PRG(s_ij)``
   with ``s_ij = HKDF(X25519(sk_i, pk_j))``. Uploaders form ``U3``; ``D = U2 - U3`` dropped.
4. ``STAGE_UNMASK``: every silo still present reveals its share of ``b_k`` for each ``k`` in
   ``U3`` and of ``sk_j`` for each ``j`` in ``D``, never both for one silo (enforced). With at least
   ``t`` answers the server rebuilds the seeds, removes every mask and decodes the plain sum.

Masks come from :mod:`silotune.crypto.prg` (AES-256-CTR), never a statistical generator; every round
uses fresh keys and seeds. Callers pre-weight updates by ``n_i / N`` so the sum is the weighted
FedAvg; values are clipped and quantised by :class:`~silotune.crypto.fixedpoint.FixedPointCodec`
(32 bits, ``n_silos = len(silo_ids)``), so the decoded sum is within ``codec.sum_tolerance()``.
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import ArrayLike, NDArray

from silotune.crypto import prg, shamir
from silotune.crypto.exceptions import AuthenticationError, CryptoError, KeyMaterialError
from silotune.crypto.masking_wire import (
    KIND_BUNDLE,
    KIND_KEYS,
    KIND_MASKED,
    KIND_PUBKEY,
    KIND_REVEAL,
    KIND_UNMASK,
    STAGE_COLLECT_MASKED_VECTORS,
    STAGE_SETUP,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    STAGES,
    VERSION,
    SecAggConfig,
    pack_ids,
    pack_message,
    pair_seed,
    parse_key_broadcast,
    parse_unmask_request,
    unpack_message,
)
from silotune.crypto.x25519 import check_public_key

__all__ = [
    "STAGE_SETUP",
    "STAGE_SHARE_KEYS",
    "STAGE_COLLECT_MASKED_VECTORS",
    "STAGE_UNMASK",
    "STAGES",
    "SecAggConfig",
    "MaskingClient",
    "MaskingServer",
    "pair_seed",
]

logger = logging.getLogger(__name__)

_SHARE_SELF, _SHARE_KEY = 0, 1
_LABEL_SELF, _LABEL_PAIR = b"secagg/self", b"secagg/pair"


class MaskingClient:
    """Silo side of one round. Call the stage methods in order (or :meth:`handle`)."""

    def __init__(self, silo_id: int) -> None:
        self.silo_id = silo_id
        self._stage: str | None = None
        self._config: SecAggConfig | None = None
        self._public_keys: dict[int, bytes] = {}
        self._u2: list[int] = []
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (self share, key share)
        self._unmasked = False

    @property
    def public_key(self) -> bytes:
        """This round's X25519 mask public key (after :meth:`setup`)."""
        if self._stage is None:
            raise ValueError("The mask key exists only after the setup stage.")
        return self._mask_key.public_key().public_bytes_raw()

    def export_state(self) -> bytes:
        """Serialize this client's round state (secret: keep it on the silo, never send it).

        Lets a silo that handles each stage in a fresh process (Flower keeps per-node state in a
        record between messages) resume the round with :meth:`restore_state`.
        """
        doc: dict[str, Any] = {
            "version": VERSION,
            "silo_id": self.silo_id,
            "stage": self._stage,
            "config": self._config.to_bytes().decode() if self._config is not None else None,
            "public_keys": {str(k): v.hex() for k, v in self._public_keys.items()},
            "u2": self._u2,
            "held": {str(k): [a.hex(), b.hex()] for k, (a, b) in self._held.items()},
            "unmasked": self._unmasked,
        }
        if self._stage is not None:
            doc["mask_key"] = self._mask_key.private_bytes_raw().hex()
            doc["self_seed"] = self._self_seed.hex()
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def restore_state(cls, data: bytes) -> MaskingClient:
        """Rebuild a client from :meth:`export_state` output."""
        try:
            doc = json.loads(bytes(data).decode())
            if doc["version"] != VERSION:
                raise ValueError(f"version {doc['version']!r}")
            client = cls(int(doc["silo_id"]))
            client._stage = doc["stage"]
            if doc["config"] is not None:
                client._config = SecAggConfig.from_bytes(doc["config"].encode())
            client._public_keys = {int(k): bytes.fromhex(v) for k, v in doc["public_keys"].items()}
            client._u2 = [int(x) for x in doc["u2"]]
            client._held = {
                int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in doc["held"].items()
            }
            client._unmasked = bool(doc["unmasked"])
            if client._stage is not None:
                client._mask_key = X25519PrivateKey.from_private_bytes(
                    bytes.fromhex(doc["mask_key"])
                )
                client._self_seed = bytes.fromhex(doc["self_seed"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise KeyMaterialError(f"Saved masking client state is malformed: {exc}") from exc
        if client._stage is not None and client._stage not in STAGES:
            raise KeyMaterialError(
                f"Saved masking client state has unknown stage {client._stage!r}."
            )
        return client

    def _expect(self, previous: str, stage: str) -> SecAggConfig:
        if self._stage != previous or self._config is None:
            raise ValueError(
                f"Stage {stage!r} must follow {previous!r}, but the last was {self._stage!r}."
            )
        self._stage = stage
        return self._config

    def handle(self, stage: str, message: Any, update: ArrayLike | None = None) -> Any:
        """Dispatch one incoming message by stage name and return the reply."""
        if stage == STAGE_SETUP:
            return self.setup(message)
        if stage == STAGE_SHARE_KEYS:
            return self.share_keys(message)
        if stage == STAGE_COLLECT_MASKED_VECTORS:
            if update is None:
                raise ValueError(f"Stage {stage!r} needs the update vector.")
            return self.masked_update(message, update)
        if stage == STAGE_UNMASK:
            return self.unmask(message)
        raise ValueError(f"Unknown stage: {stage!r}; expected one of {STAGES}.")

    def setup(self, config_bytes: bytes) -> bytes:
        """``STAGE_SETUP``: read the config, draw fresh keys; return the public-key message."""
        if self._stage is not None:
            raise ValueError(f"Stage {STAGE_SETUP!r} runs once per round; this client is past it.")
        config = SecAggConfig.from_bytes(config_bytes)
        if self.silo_id not in config.silo_ids:
            raise ValueError(
                f"Silo {self.silo_id} is not in the round's silo_ids {config.silo_ids}."
            )
        self._config = config
        self._stage = STAGE_SETUP
        self._mask_key = X25519PrivateKey.generate()  # fresh every round
        self._self_seed = secrets.token_bytes(32)
        pk = self._mask_key.public_key().public_bytes_raw()
        return pack_message(KIND_PUBKEY, config.round_id, self.silo_id, pk)

    def share_keys(self, broadcast: bytes) -> dict[int, bytes]:
        """``STAGE_SHARE_KEYS``: check the key broadcast; return ``{peer_id: bundle}``.

        Each bundle holds this silo's shares of its self-mask seed and of its mask private key
        for one peer. The caller must encrypt every bundle end-to-end for that peer.
        """
        config = self._expect(STAGE_SETUP, STAGE_SHARE_KEYS)
        return self._share(config, parse_key_broadcast(broadcast, config))

    def share_keys_verified(self, keys: Mapping[int, bytes]) -> dict[int, bytes]:
        """``STAGE_SHARE_KEYS`` from keys the caller already checked (signed by their owners).

        Same result as :meth:`share_keys`; the caller has verified that each key belongs to the
        silo it is listed under (the authenticated protocol of :mod:`silotune.secagg`).
        """
        config = self._expect(STAGE_SETUP, STAGE_SHARE_KEYS)
        checked = {}
        for sid, pk in keys.items():
            if sid not in config.silo_ids:
                raise CryptoError(f"Key set names silo {sid}, which is not in the round.")
            checked[int(sid)] = check_public_key(pk, f"mask key of silo {sid}")
        if len(checked) < config.threshold:
            raise CryptoError(
                f"Key set has {len(checked)} keys; the threshold is {config.threshold}."
            )
        return self._share(config, checked)

    def _share(self, config: SecAggConfig, keys: dict[int, bytes]) -> dict[int, bytes]:
        own = self._mask_key.public_key().public_bytes_raw()
        if keys.get(self.silo_id) != own:
            raise AuthenticationError(
                f"Key broadcast does not carry silo {self.silo_id}'s own key."
            )
        self._public_keys = keys
        n = len(config.silo_ids)
        self_shares = shamir.split(self._self_seed, config.threshold, n)
        key_shares = shamir.split(self._mask_key.private_bytes_raw(), config.threshold, n)
        bundles = {}
        for peer in keys:
            x = config.share_x(peer) - 1
            body = struct.pack(">Q", peer) + self_shares[x] + key_shares[x]
            if peer == self.silo_id:
                self._held[peer] = (self_shares[x], key_shares[x])
            else:
                bundles[peer] = pack_message(KIND_BUNDLE, config.round_id, self.silo_id, body)
        return bundles

    def masked_update(
        self,
        bundles: Mapping[int, bytes],
        update: ArrayLike,
        peers: Sequence[int] | None = None,
    ) -> bytes:
        """``STAGE_COLLECT_MASKED_VECTORS``: store peers' bundles; return the masked upload.

        ``peers`` is ``U2``, the silos whose (authenticated) bundles the server routed: this silo
        masks with each of them even when a bundle failed to open here (it then holds no share of
        that silo's secrets). Without it, ``U2`` is the silos whose bundles are in ``bundles``.
        """
        config = self._expect(STAGE_SHARE_KEYS, STAGE_COLLECT_MASKED_VECTORS)
        vec = np.asarray(update).reshape(-1)
        if vec.size != config.vector_length:
            raise ValueError(f"update has {vec.size} values, config says {config.vector_length}.")
        for sender, bundle in bundles.items():
            s_share, k_share = self.open_bundle(sender, bundle)
            self._held[sender] = (s_share, k_share)
        self._u2 = sorted(self._held if peers is None else set(peers) | {self.silo_id})
        if not set(self._held) <= set(self._u2) <= set(self._public_keys):
            raise CryptoError(
                "The routed silo set must hold every bundle sender and only keyed silos."
            )
        if len(self._u2) < config.threshold:
            raise CryptoError(
                f"Only {len(self._u2)} silos shared keys; the threshold is {config.threshold}."
            )
        n, r = config.vector_length, config.round_id
        masked = config.codec.encode(vec)
        masked += prg.expand(self._self_seed, n, label=_LABEL_SELF, round_id=r)
        for peer in self._u2:
            if peer == self.silo_id:
                continue
            seed = pair_seed(self._mask_key, self._public_keys[peer], r, self.silo_id, peer)
            mask = prg.expand(seed, n, label=_LABEL_PAIR, round_id=r)
            if peer > self.silo_id:
                masked += mask
            else:
                masked -= mask
        upload = struct.pack(">Q", n) + masked.astype("<u4").tobytes()
        return pack_message(KIND_MASKED, r, self.silo_id, upload)

    def open_bundle(self, sender: int, bundle: bytes) -> tuple[bytes, bytes]:
        """Check one peer's (opened) share bundle; return its (self-seed, key) shares for us."""
        config = self._config
        if config is None:
            raise ValueError("Bundles can be opened only after the setup stage.")
        owner, body = unpack_message(bundle, KIND_BUNDLE, config.round_id, "Share bundle")
        if owner != sender or sender not in self._public_keys or sender == self.silo_id:
            raise AuthenticationError(f"Share bundle from silo {sender} names owner {owner}.")
        if len(body) != 8 + 2 * shamir.SHARE_BYTES:
            raise CryptoError(f"Share bundle from silo {sender} has a bad length {len(body)}.")
        (recipient,) = struct.unpack_from(">Q", body, 0)
        if recipient != self.silo_id:
            raise AuthenticationError(f"Share bundle from silo {sender} is for silo {recipient}.")
        s_share = bytes(body[8 : 8 + shamir.SHARE_BYTES])
        k_share = bytes(body[8 + shamir.SHARE_BYTES :])
        for share in (s_share, k_share):
            if shamir.Share.from_bytes(share).x != config.share_x(self.silo_id):
                raise AuthenticationError(f"Share bundle from silo {sender} holds another x.")
        return s_share, k_share

    def unmask(self, request: bytes) -> bytes:
        """``STAGE_UNMASK``: reveal self-seed shares of survivors and key shares of dropped silos.

        Raises if a silo is in both sets, if asked twice, or if fewer than ``threshold`` survive:
        revealing both shares of one silo would let the server unmask its individual update.
        """
        config = self._expect(STAGE_COLLECT_MASKED_VECTORS, STAGE_UNMASK)
        if self._unmasked:
            raise CryptoError("This silo already answered the unmask request of this round.")
        survivors, dropped = parse_unmask_request(request, config)
        both = set(survivors) & set(dropped)
        if both:
            raise CryptoError(f"Refusing to reveal both shares of silos {sorted(both)}.")
        unknown = (set(survivors) | set(dropped)) - set(self._u2)
        if unknown:
            raise CryptoError(f"Unmask request names silos {sorted(unknown)} that shared no keys.")
        if self.silo_id not in survivors:
            raise CryptoError(f"Unmask request does not list silo {self.silo_id} as a survivor.")
        if len(survivors) < config.threshold:
            raise CryptoError(
                f"Only {len(survivors)} survivors; the threshold is {config.threshold}."
            )
        self._unmasked = True
        # A silo whose bundle failed to open here has no share held: reveal what is held.
        entries = [
            struct.pack(">QB", k, _SHARE_SELF) + self._held[k][0]
            for k in survivors
            if k in self._held
        ]
        entries += [
            struct.pack(">QB", j, _SHARE_KEY) + self._held[j][1] for j in dropped if j in self._held
        ]
        body = struct.pack(">H", len(entries)) + b"".join(entries)
        return pack_message(KIND_REVEAL, config.round_id, self.silo_id, body)


class MaskingServer:
    """Server side of one round: routes messages, never sees an unmasked individual update."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._keys: dict[int, bytes] = {}
        self._u1: list[int] | None = None
        self._bundles: dict[int, dict[int, bytes]] = {}
        self._u2: list[int] | None = None
        self._masked: dict[int, NDArray[np.uint32]] = {}
        self._request: tuple[list[int], list[int]] | None = None
        self._reveals: dict[int, dict[tuple[int, int], bytes]] = {}

    def handle(self, stage: str, message: Any, sender: int | None = None) -> None:
        """Record one silo's reply to the server's ``stage`` message.

        Replies: ``STAGE_SETUP`` -> public key, ``STAGE_SHARE_KEYS`` -> ``{peer: bundle}`` from
        ``sender``, ``STAGE_COLLECT_MASKED_VECTORS`` -> masked upload, ``STAGE_UNMASK`` -> reveal.
        """
        if stage == STAGE_SETUP:
            self.receive_public_key(message)
        elif stage == STAGE_SHARE_KEYS:
            if sender is None:
                raise ValueError(f"Stage {stage!r} replies need the sender's silo id.")
            self.receive_bundles(sender, message)
        elif stage == STAGE_COLLECT_MASKED_VECTORS:
            self.receive_masked(message)
        elif stage == STAGE_UNMASK:
            self.receive_reveal(message)
        else:
            raise ValueError(f"Unknown stage: {stage!r}; expected one of {STAGES}.")

    def setup_message(self) -> bytes:
        """``STAGE_SETUP`` message for every silo."""
        return self.config.to_bytes()

    def receive_public_key(self, message: bytes) -> None:
        """Record one silo's mask public key (answer to ``STAGE_SETUP``)."""
        if self._u1 is not None:
            raise CryptoError("Public keys arrived after the key broadcast was sent.")
        sender, body = unpack_message(
            message, KIND_PUBKEY, self.config.round_id, "Public key message"
        )
        self.add_public_key(sender, bytes(body))

    def add_public_key(self, sender: int, public_key: bytes) -> None:
        """Record silo ``sender``'s mask public key (already authenticated by the caller)."""
        if self._u1 is not None:
            raise CryptoError("Public keys arrived after the key broadcast was sent.")
        if sender not in self.config.silo_ids or sender in self._keys:
            raise CryptoError(f"Public key from unknown or repeated silo {sender}.")
        self._keys[sender] = check_public_key(public_key, f"mask key of silo {sender}")

    def key_broadcast(self) -> bytes:
        """``STAGE_SHARE_KEYS`` message: every received public key; fixes ``U1``."""
        if len(self._keys) < self.config.threshold:
            raise CryptoError(
                f"Only {len(self._keys)} silos sent keys; the threshold is {self.config.threshold}."
            )
        self._u1 = sorted(self._keys)
        body = struct.pack(">H", len(self._u1))
        body += b"".join(struct.pack(">Q", s) + self._keys[s] for s in self._u1)
        return pack_message(KIND_KEYS, self.config.round_id, 0, body)

    def receive_bundles(self, sender: int, bundles: Mapping[int, bytes]) -> None:
        """Record one silo's (caller-encrypted, opaque) bundles; the silo joins ``U2``."""
        if self._u1 is None or self._u2 is not None:
            raise CryptoError("Share bundles arrive only after the key broadcast, before routing.")
        if sender not in self._u1 or sender in self._bundles:
            raise CryptoError(f"Share bundles from unknown or repeated silo {sender}.")
        expected = set(self._u1) - {sender}
        if set(bundles) != expected:
            raise CryptoError(f"Silo {sender} must send one bundle to each of {sorted(expected)}.")
        self._bundles[sender] = {int(k): bytes(v) for k, v in bundles.items()}

    def bundles_for(self, recipient: int) -> dict[int, bytes]:
        """Bundles for ``recipient`` as ``{sender: bundle}``; the first call fixes ``U2``."""
        if self._u2 is None:
            if len(self._bundles) < self.config.threshold:
                raise CryptoError(
                    f"Only {len(self._bundles)} silos sent shares; "
                    f"the threshold is {self.config.threshold}."
                )
            self._u2 = sorted(self._bundles)
        return {s: self._bundles[s][recipient] for s in self._u2 if s != recipient}

    def receive_masked(self, message: bytes) -> None:
        """Record one masked upload; the silo joins ``U3``."""
        if self._u2 is None or self._request is not None:
            raise CryptoError("Masked uploads arrive only after routing shares, before unmasking.")
        sender, body = unpack_message(message, KIND_MASKED, self.config.round_id, "Masked upload")
        if sender not in self._u2 or sender in self._masked:
            raise CryptoError(f"Masked upload from unknown or repeated silo {sender}.")
        n = self.config.vector_length
        if len(body) != 8 + 4 * n or struct.unpack_from(">Q", body, 0)[0] != n:
            raise CryptoError(f"Masked upload from silo {sender} must hold exactly {n} values.")
        self._masked[sender] = np.frombuffer(body[8:], dtype="<u4").astype(np.uint32)

    def exclude(self, silo: int) -> None:
        """Leave ``silo`` out of ``U3`` (before the unmask request): it counts as dropped."""
        if self._request is not None:
            raise CryptoError("Silos can be excluded only before the unmask request.")
        self._masked.pop(silo, None)

    def unmask_request(self) -> bytes:
        """``STAGE_UNMASK`` message naming survivors ``U3`` and dropped ``U2 - U3``."""
        if self._u2 is None:
            raise CryptoError("Unmasking needs shares routed and uploads collected first.")
        survivors = sorted(self._masked)
        if len(survivors) < self.config.threshold:
            raise CryptoError(
                f"Only {len(survivors)} silos uploaded masked vectors; "
                f"the threshold is {self.config.threshold}."
            )
        dropped = [s for s in self._u2 if s not in self._masked]
        self._request = (survivors, dropped)
        return pack_message(
            KIND_UNMASK, self.config.round_id, 0, pack_ids(survivors) + pack_ids(dropped)
        )

    def receive_reveal(self, message: bytes) -> None:
        """Record one silo's revealed shares, checking they are exactly the ones requested."""
        if self._request is None:
            raise CryptoError("Reveals arrive only after the unmask request.")
        survivors, dropped = self._request
        sender, body = unpack_message(message, KIND_REVEAL, self.config.round_id, "Reveal")
        if sender not in survivors or sender in self._reveals:
            raise CryptoError(f"Reveal from silo {sender}, which is not an unrevealed survivor.")
        wanted = {(k, _SHARE_SELF) for k in survivors} | {(j, _SHARE_KEY) for j in dropped}
        step = 9 + shamir.SHARE_BYTES
        if len(body) < 2 or len(body) != 2 + step * struct.unpack_from(">H", body, 0)[0]:
            raise CryptoError(f"Reveal from silo {sender} is truncated or has trailing bytes.")
        got: dict[tuple[int, int], bytes] = {}
        x = self.config.share_x(sender)
        for off in range(2, len(body), step):
            owner, kind = struct.unpack_from(">QB", body, off)
            share = bytes(body[off + 9 : off + step])
            if (owner, kind) not in wanted or (owner, kind) in got:
                raise CryptoError(f"Reveal from silo {sender} holds an unrequested share.")
            if shamir.Share.from_bytes(share).x != x:
                raise AuthenticationError(f"Reveal from silo {sender} holds a share of another x.")
            got[(owner, kind)] = share
        # A silo may lack the share of a peer whose bundle failed to open there; each secret
        # still needs `threshold` shares in aggregate().
        self._reveals[sender] = got

    def aggregate(self) -> NDArray[np.float32]:
        """Remove all masks and decode the plain (weighted) sum of the survivors' updates.

        Returns
        -------
        numpy.ndarray
            Float32, shape ``(vector_length,)``.
        """
        if self._request is None:
            raise CryptoError("Aggregation needs the unmask request to have been sent.")
        survivors, dropped = self._request
        t = self.config.threshold
        if len(self._reveals) < t:
            raise CryptoError(f"Only {len(self._reveals)} silos revealed shares; need {t}.")
        n, r = self.config.vector_length, self.config.round_id

        def rebuild(owner: int, kind: int) -> bytes:
            shares = [rev[(owner, kind)] for rev in self._reveals.values() if (owner, kind) in rev]
            if len(shares) < t:
                what = "self-mask seed" if kind == _SHARE_SELF else "mask key"
                raise CryptoError(
                    f"Only {len(shares)} shares of silo {owner}'s {what} were revealed; need {t}."
                )
            return shamir.combine(shares)

        total = np.zeros(n, dtype=np.uint32)
        for k in survivors:
            total += self._masked[k]
            total -= prg.expand(rebuild(k, _SHARE_SELF), n, label=_LABEL_SELF, round_id=r)
        for j in dropped:
            try:
                sk_j = X25519PrivateKey.from_private_bytes(rebuild(j, _SHARE_KEY))
            except ValueError as exc:
                raise KeyMaterialError(f"Rebuilt mask key of silo {j} is invalid.") from exc
            if sk_j.public_key().public_bytes_raw() != self._keys[j]:
                raise AuthenticationError(
                    f"Rebuilt mask key of silo {j} does not match its public key."
                )
            for k in survivors:
                mask = prg.expand(
                    pair_seed(sk_j, self._keys[k], r, j, k), n, label=_LABEL_PAIR, round_id=r
                )
                # Survivor k added +mask when j > k and -mask when j < k: undo it.
                if j > k:
                    total -= mask
                else:
                    total += mask
        logger.debug(
            "Unmasked round %s: %d survivors, %d dropped.", r, len(survivors), len(dropped)
        )
        return self.config.codec.decode_sum(total, n_terms=len(survivors))
