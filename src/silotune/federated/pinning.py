"""Authenticated transport keys: each silo signs its X25519 transport key with its Ed25519 identity.

Share bundles and the HE secret are sealed to peers' transport keys, which the coordinator relays.
When silos hold identity keys and an enrollment of every silo's public identity (deployment:
`federation.identity_key` and `federation.enrollment`; simulation: generated per job), a silo
seals only to a transport key signed by an enrolled peer, so a coordinator that substitutes keys
is detected (:class:`AuthenticationError` / :class:`UnknownIdentityError`) instead of reading the
payload. Without them (``SiloTrust()``), keys are trusted as relayed (honest-but-curious model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from silotune.crypto import statements
from silotune.crypto.exceptions import AuthenticationError
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.crypto.x25519 import check_public_key
from silotune.errors import ConfigError

_PURPOSE = "federated/transport-key"  # signed with the job id: no reuse across jobs


@dataclass
class SiloTrust:
    """A silo's identity key and the enrollment it checks peers against (both or neither)."""

    key: IdentityKey | None = None
    enrollment: Enrollment | None = None
    name: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if (self.key is None) != (self.enrollment is None):
            raise ConfigError(
                "federation.identity_key and federation.enrollment must be set together"
            )
        if self.key is not None and self.enrollment is not None:
            self.name = self.enrollment.name_of(self.key.public)

    @classmethod
    def from_files(cls, key: str | None, enrollment: str | None) -> SiloTrust:
        """Load the configured identity key and enrollment (or neither)."""
        if key is None and enrollment is None:
            return cls()
        if key is None or enrollment is None:
            raise ConfigError(
                "federation.identity_key and federation.enrollment must be set together"
            )
        return cls(
            IdentityKey.load(Path(key).expanduser()), Enrollment.load(Path(enrollment).expanduser())
        )

    def __reduce__(self) -> tuple[object, tuple[bytes | None, str | None]]:
        # Ray ships the ClientApp (and this) to its worker processes; keys are not picklable.
        pem = self.key.to_pem() if self.key is not None else None
        roster = self.enrollment.to_json() if self.enrollment is not None else None
        return _restore, (pem, roster)

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def sign(self, transport_pk: bytes, job: bytes) -> tuple[str, bytes]:
        """(enrolled name, signature of the transport key for ``job``), or ("", b"")."""
        if self.key is None:
            return "", b""
        fields = {"name": self.name, "key": transport_pk}
        return self.name, statements.sign(self.key, _PURPOSE, job, 0, fields)

    def verify(self, peers: dict[int, tuple[str, bytes, bytes]], what: str, job: bytes) -> None:
        """Check every peer's (name, transport key, signature) for ``job``; names distinct."""
        if self.enrollment is None:
            return
        names = [name for name, _, _ in peers.values()]
        if len(set(names)) != len(names):
            raise AuthenticationError(f"{what}: one enrolled silo is presented as several peers")
        for peer, (name, pk, sig) in peers.items():
            if not name or not sig:
                raise AuthenticationError(f"{what}: the transport key of peer {peer} is unsigned")
            try:
                check_public_key(pk, f"{what}: the transport key of peer {peer}")
                fields = {"name": name, "key": pk}
                statements.verify(self.enrollment.get(name), sig, _PURPOSE, job, 0, fields, what)
            except AuthenticationError:
                raise AuthenticationError(
                    f"{what}: the transport key of peer {peer} is not signed by enrolled silo "
                    f"{name!r} (substituted by the coordinator?)"
                ) from None


def _restore(pem: bytes | None, roster: str | None) -> SiloTrust:
    key = IdentityKey.from_pem(pem) if pem is not None else None
    return SiloTrust(key, Enrollment.from_json(roster) if roster is not None else None)


def simulation_trust(silos: int) -> dict[int, SiloTrust]:
    """Fresh identities for simulated silos 0..silos-1 and the enrollment of all of them."""
    keys = {p: IdentityKey.generate() for p in range(silos)}
    enrollment = Enrollment({f"silo-{p}": k.public for p, k in keys.items()})
    return {p: SiloTrust(k, enrollment) for p, k in keys.items()}
