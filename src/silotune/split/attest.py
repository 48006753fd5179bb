"""Remote attestation of the trunk enclave by a silo, on the connection it then trains over.

Before its handshake a silo sends ``b"SATQ" || nonce`` (a fresh random 32-byte nonce); the host
relays it to the enclave, which answers with a :class:`~silotune.enclave.base.Quote`. The silo
verifies the quote (platform key, allow-listed measurement, its own nonce) and pins the quote's
report data, the enclave identity's public key, as the coordinator key for the handshake, so the
session keys are shared with the enclave and never with the host.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from silotune.crypto.exceptions import CryptoError
from silotune.crypto.identity import PublicIdentity
from silotune.enclave.base import (
    MAX_NONCE_SIZE,
    MIN_NONCE_SIZE,
    AttestationError,
    AttestationPolicy,
    verify_quote,
)
from silotune.transport.base import Connection, TransportError

if TYPE_CHECKING:
    from silotune.config import JobConfig

__all__ = ["attest_trunk", "attest_request", "parse_attest_request", "trunk_policy"]

REQUEST_MAGIC = b"SATQ"
NONCE_SIZE = 32


def attest_request(nonce: bytes) -> bytes:
    """The attestation request carrying ``nonce``."""
    if not MIN_NONCE_SIZE <= len(nonce) <= MAX_NONCE_SIZE:
        raise AttestationError(f"an attestation nonce is {MIN_NONCE_SIZE}..{MAX_NONCE_SIZE} bytes")
    return REQUEST_MAGIC + nonce


def parse_attest_request(message: bytes) -> bytes:
    """The nonce of an attestation request; AttestationError if the message is not one."""
    nonce = message[len(REQUEST_MAGIC) :]
    if not message.startswith(REQUEST_MAGIC) or not MIN_NONCE_SIZE <= len(nonce) <= MAX_NONCE_SIZE:
        raise AttestationError(
            "the first message on a connection to the trunk enclave must be an attestation request"
        )
    return nonce


def attest_trunk(
    connection: Connection, policy: AttestationPolicy, timeout: float
) -> PublicIdentity:
    """Attest the enclave behind ``connection``; return its identity to pin for the handshake.

    Raises
    ------
    AttestationError
        If the quote fails :func:`~silotune.enclave.base.verify_quote` or never comes; the
        connection is closed then.
    """
    nonce = os.urandom(NONCE_SIZE)
    try:
        connection.send(attest_request(nonce))
        answer = connection.recv(timeout)
        quote = verify_quote(answer, policy, nonce)
        return PublicIdentity.from_bytes(quote.report_data)
    except AttestationError as exc:
        connection.close()
        raise AttestationError(f"refused the coordinator's enclave: {exc}") from None
    except TransportError as exc:
        connection.close()
        raise AttestationError(
            f"the coordinator did not answer the attestation request ({exc}); does it run with "
            "split.trunk_in_enclave: true?"
        ) from None
    except CryptoError as exc:
        connection.close()
        raise AttestationError(
            f"the enclave's quote carries no valid identity key: {exc}"
        ) from None


def trunk_policy(cfg: JobConfig) -> AttestationPolicy:
    """What a silo of job ``cfg`` accepts: ``enclave.platform_key`` and the allow-list.

    An empty ``enclave.allowed_measurements`` allows exactly the measurement this silotune build
    computes for the job's trunk enclave, which needs the enrollment (``enrollment.json``, public
    keys only) in ``split.keys_dir``.
    """
    from silotune.enclave.measure import measure
    from silotune.enclave.platform import load_platform_public
    from silotune.split.keys import load_enrollment
    from silotune.split.trunk_app import trunk_app_config

    platform = load_platform_public(cfg.enclave.platform_key)
    allowed = cfg.enclave.allowed_measurements
    if not allowed:
        enrollment = load_enrollment(cfg.split.keys_dir, _ROLE)
        allowed = [measure("trunk", trunk_app_config(cfg, enrollment)).hex()]
    return AttestationPolicy.from_hex(platform, allowed)


_ROLE = (
    "silo (with an empty enclave.allowed_measurements it computes the trunk enclave's "
    "measurement from the enrollment)"
)
