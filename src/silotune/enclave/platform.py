"""The simulated platform: its Ed25519 key (the stand-in for a hardware vendor's), secret and quotes.

On real hardware a key fused into or certified for the CPU signs quotes and a per-CPU secret roots
the sealing keys; here one Ed25519 key file plays both roles. The private key stays on the machine
that runs enclaves (``enclave.platform_key`` on the coordinator); verifiers hold the public key.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from silotune.crypto.exceptions import CryptoError
from silotune.crypto.identity import IdentityKey, PublicIdentity
from silotune.enclave.base import Quote, quote_message
from silotune.errors import ConfigError

__all__ = [
    "PLATFORM_KEY",
    "PLATFORM_PUB",
    "load_platform_key",
    "load_platform_public",
    "platform_secret",
    "sign_quote",
    "write_platform_key",
]

PLATFORM_KEY = "platform.key"
PLATFORM_PUB = "platform.pub"
BACKEND = "simulated"
_SECRET_INFO = b"silotune/simulated-platform-secret/v1"


def write_platform_key(folder: Path) -> tuple[Path, Path]:
    """Create a fresh simulated platform key pair in ``folder``; never overwrites a key."""
    folder.mkdir(parents=True, exist_ok=True)
    key = IdentityKey.generate()
    private, public = folder / PLATFORM_KEY, folder / PLATFORM_PUB
    try:
        key.save(private)
        key.public.save(public)
    except (FileExistsError, CryptoError) as exc:
        raise ConfigError(f"cannot write the platform key to {folder}: {exc}") from None
    return private, public


def load_platform_key(path: Path | None) -> IdentityKey:
    """The simulated platform's private key from ``enclave.platform_key`` (where enclaves run)."""
    if path is None:
        raise ConfigError(
            "enclave.platform_key is not set; the machine that runs the enclave needs the "
            "simulated platform's private key (make one with `silotune enclave platform-key`)"
        )
    try:
        return IdentityKey.load(path)
    except FileNotFoundError:
        raise ConfigError(f"enclave.platform_key {path} does not exist") from None
    except CryptoError as exc:
        raise ConfigError(
            f"enclave.platform_key {path} is not a private platform key ({exc})"
        ) from None


def load_platform_public(path: Path | None) -> PublicIdentity:
    """The platform's public key from ``enclave.platform_key`` (a verifier; a private key works)."""
    if path is None:
        raise ConfigError(
            "enclave.platform_key is not set; a verifier needs the simulated platform's public "
            "key (platform.pub from `silotune enclave platform-key`)"
        )
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"enclave.platform_key {path} does not exist") from None
    try:
        if b"PRIVATE KEY" in data:
            return IdentityKey.load(path).public
        return PublicIdentity.from_pem(data)
    except CryptoError as exc:
        raise ConfigError(f"enclave.platform_key {path} is not a platform key ({exc})") from None


def platform_secret(key: IdentityKey) -> bytes:
    """The platform's 32-byte root of sealing keys (on hardware: a per-CPU fused secret)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SECRET_INFO)
    return hkdf.derive(key.to_pem())


def sign_quote(key: IdentityKey, measurement: bytes, nonce: bytes, report_data: bytes) -> Quote:
    """A quote for ``measurement`` answering ``nonce``, signed by the simulated platform key."""
    unsigned = Quote(BACKEND, measurement, nonce, report_data)
    return Quote(BACKEND, measurement, nonce, report_data, key.sign(quote_message(unsigned)))
