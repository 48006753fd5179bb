"""Identity-key files of a split job: who the coordinator is and which silos it lets in.

In a deployment ``split.keys_dir`` is the party's own folder from ``silotune keygen``: the
coordinator's holds ``coordinator.key`` and ``enrollment.json``; a silo's holds ``identity.pem``
(its private key), ``coordinator.pub`` and ``enrollment.json``. For a one-machine run
(``silotune train``) :func:`write_job_keys` puts every party's files in one throwaway folder,
where a silo's key is ``<silo>.key``.
"""

from __future__ import annotations

from pathlib import Path

from silotune.crypto.exceptions import CryptoError
from silotune.crypto.identity import Enrollment, IdentityKey, PublicIdentity
from silotune.errors import ConfigError
from silotune.keygen import COORDINATOR_KEY, COORDINATOR_PUB, ENROLLMENT, IDENTITY_KEY

__all__ = [
    "COORDINATOR_KEY",
    "COORDINATOR_PUB",
    "ENROLLMENT",
    "load_coordinator_keys",
    "load_enrollment",
    "load_silo_identity",
    "load_silo_keys",
    "write_job_keys",
]


def write_job_keys(folder: Path, silo_names: list[str]) -> None:
    """Create fresh identities for a coordinator and ``silo_names`` plus the enrollment file."""
    folder.mkdir(parents=True, exist_ok=True)
    coordinator = IdentityKey.generate()
    coordinator.save(folder / COORDINATOR_KEY)
    coordinator.public.save(folder / COORDINATOR_PUB)
    enrollment = Enrollment()
    for name in silo_names:
        key = IdentityKey.generate()
        key.save(folder / f"{name}.key")
        key.public.save(folder / f"{name}.pub")
        enrollment.add(name, key.public)
    enrollment.save(folder / ENROLLMENT)


def _need_dir(folder: Path | None, role: str, files: str) -> Path:
    if folder is None:
        raise ConfigError(
            f"split.keys_dir is not set; the {role} needs a folder holding {files} "
            "(see docs/split.md)"
        )
    if not folder.is_dir():
        raise ConfigError(f"split.keys_dir {folder} does not exist; the {role} needs {files}")
    return folder


def load_coordinator_keys(folder: Path | None) -> tuple[IdentityKey, Enrollment]:
    """The coordinator's identity key and enrollment from ``split.keys_dir``."""
    folder = _need_dir(folder, "coordinator", f"{COORDINATOR_KEY} and {ENROLLMENT}")
    try:
        return IdentityKey.load(folder / COORDINATOR_KEY), Enrollment.load(folder / ENROLLMENT)
    except FileNotFoundError as exc:
        raise ConfigError(f"split.keys_dir: {exc.filename} is missing") from None
    except CryptoError as exc:
        raise ConfigError(f"split.keys_dir: {exc}") from None


def _silo_key_file(folder: Path, silo_name: str) -> Path:
    """``identity.pem`` (a party folder from silotune keygen) or ``<silo>.key`` (one-machine run)."""
    own = folder / IDENTITY_KEY
    return own if own.is_file() else folder / f"{silo_name}.key"


def load_silo_keys(folder: Path | None, silo_name: str) -> tuple[IdentityKey, PublicIdentity]:
    """A silo's identity key and the pinned coordinator key from ``split.keys_dir``."""
    folder = _need_dir(folder, f"silo {silo_name!r}", f"{IDENTITY_KEY} and {COORDINATOR_PUB}")
    try:
        return IdentityKey.load(_silo_key_file(folder, silo_name)), PublicIdentity.load(
            folder / COORDINATOR_PUB
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"split.keys_dir: {exc.filename} is missing") from None
    except CryptoError as exc:
        raise ConfigError(f"split.keys_dir: {exc}") from None


def load_enrollment(folder: Path | None, role: str = "coordinator") -> Enrollment:
    """The enrollment (silos' public keys) from ``split.keys_dir``; ``role`` names who needs it."""
    folder = _need_dir(folder, role, ENROLLMENT)
    try:
        return Enrollment.load(folder / ENROLLMENT)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"split.keys_dir: {exc.filename} is missing; the {role} needs it"
        ) from None
    except CryptoError as exc:
        raise ConfigError(f"split.keys_dir: {exc}") from None


def load_silo_identity(folder: Path | None, silo_name: str) -> IdentityKey:
    """A silo's own identity key (the trunk-in-enclave case: the coordinator key comes attested)."""
    folder = _need_dir(folder, f"silo {silo_name!r}", IDENTITY_KEY)
    try:
        return IdentityKey.load(_silo_key_file(folder, silo_name))
    except FileNotFoundError as exc:
        raise ConfigError(f"split.keys_dir: {exc.filename} is missing") from None
    except CryptoError as exc:
        raise ConfigError(f"split.keys_dir: {exc}") from None
