"""Identity-key files of a split job: who the coordinator is and which silos it lets in.

Layout of ``split.keys_dir`` (what ``write_job_keys`` writes for a whole job; each party then
keeps only its own files)::

    coordinator.key     the coordinator's Ed25519 private key (coordinator only, mode 0600)
    coordinator.pub     its public key, pinned by every silo
    enrollment.json     the silos' public keys, by name (coordinator only)
    <silo>.key          a silo's private key (that silo only, mode 0600)
    <silo>.pub          its public key (goes into the coordinator's enrollment)
"""

from __future__ import annotations

from pathlib import Path

from silotune.crypto.exceptions import CryptoError
from silotune.crypto.identity import Enrollment, IdentityKey, PublicIdentity
from silotune.errors import ConfigError

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

COORDINATOR_KEY = "coordinator.key"
COORDINATOR_PUB = "coordinator.pub"
ENROLLMENT = "enrollment.json"


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


def load_silo_keys(folder: Path | None, silo_name: str) -> tuple[IdentityKey, PublicIdentity]:
    """A silo's identity key and the pinned coordinator key from ``split.keys_dir``."""
    folder = _need_dir(folder, f"silo {silo_name!r}", f"{silo_name}.key and {COORDINATOR_PUB}")
    try:
        return IdentityKey.load(folder / f"{silo_name}.key"), PublicIdentity.load(
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
    folder = _need_dir(folder, f"silo {silo_name!r}", f"{silo_name}.key")
    try:
        return IdentityKey.load(folder / f"{silo_name}.key")
    except FileNotFoundError as exc:
        raise ConfigError(f"split.keys_dir: {exc.filename} is missing") from None
    except CryptoError as exc:
        raise ConfigError(f"split.keys_dir: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    """``python -m silotune.split.keys --out DIR silo-0 silo-1 ...``: write a job's identity keys."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="new or empty folder")
    parser.add_argument("silos", nargs="+", help="silo names to enroll")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; keys are never overwritten")
    write_job_keys(args.out, args.silos)
    sys.stderr.write(f"wrote coordinator and {len(args.silos)} silo identities to {args.out}\n")


if __name__ == "__main__":
    main()
