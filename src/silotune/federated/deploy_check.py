"""`silotune federate check`: is a deployed silo's setup in order before its SuperNode connects?

Each check reads one piece (the job YAML, the identity key and enrollment, the CA certificate,
the SuperNode key) and, with a SuperLink address, asks the SuperLink whether it knows the key.
A problem is one line naming the missing or wrong piece and what to do; nothing raises.
"""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from silotune.errors import SilotuneError

APP_DIR = Path(__file__).with_name("flower_app")


def app_path() -> Path:
    """The Flower app folder inside the installed package, the path `flwr run` takes."""
    return APP_DIR


@dataclass
class CheckReport:
    """What was checked: `ok` lines and `problems` lines, in the order they were found."""

    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def passed(self, line: str) -> None:
        self.ok.append(line)

    def failed(self, line: str) -> None:
        self.problems.append(line)


def check_silo(
    config: Path,
    root_certificates: Path | None,
    supernode_key: Path | None,
    superlink: str | None,
) -> CheckReport:
    """Check everything a silo needs before `flower-supernode` starts; return what was found."""
    report = CheckReport()
    _check_job(config, report)
    ca = _check_ca(root_certificates, report) if root_certificates is not None else None
    key = _check_supernode_key(supernode_key, report) if supernode_key is not None else None
    if superlink is not None:
        if ca is None or key is None or root_certificates is None:
            report.failed(
                "cannot ask the SuperLink whether this SuperNode is registered without a valid "
                "--root-certificates and --auth-supernode-private-key"
            )
        else:
            _check_registration(superlink, root_certificates, key, report)
    return report


def _check_job(config: Path, report: CheckReport) -> None:
    from silotune.config import load_config
    from silotune.federated.pinning import SiloTrust

    try:
        cfg = load_config(config)
    except SilotuneError as err:
        report.failed(str(err))
        return
    if cfg.mode != "federated":
        report.failed(f"{config}: mode is {cfg.mode!r}; a Flower silo runs mode: federated")
        return
    fed = cfg.federation
    if fed.simulation:
        report.failed(
            f"{config}: federation.simulation is true; a deployed silo sets "
            "federation.simulation: false"
        )
    if fed.identity_key is None and fed.enrollment is None:
        if fed.allow_unauthenticated or fed.secure_aggregation == "none":
            report.passed(f"{config}: runs without an identity (allowed by its settings)")
        else:
            report.failed(
                f"{config}: federation.identity_key and federation.enrollment are not set; "
                "name this silo's identity.pem and enrollment.json from silotune keygen"
            )
        return
    for key, value in (("identity_key", fed.identity_key), ("enrollment", fed.enrollment)):
        if value is None:
            report.failed(
                f"{config}: federation.{key} is not set (identity_key and enrollment go together)"
            )
            return
        if not Path(value).expanduser().is_file():
            report.failed(
                f"{config}: federation.{key} {value} does not exist (relative paths "
                f"are read from the current folder, {Path.cwd()})"
            )
            return
    try:
        trust = SiloTrust.from_files(fed.identity_key, fed.enrollment)
    except (SilotuneError, ValueError, KeyError) as err:
        report.failed(f"{config}: identity or enrollment unusable: {err}")
        return
    report.passed(
        f"identity {fed.identity_key} is enrolled as {trust.name!r} in {fed.enrollment} "
        f"({len(trust.enrollment.names()) if trust.enrollment else 0} silos)"
    )


def _check_ca(path: Path, report: CheckReport) -> list[x509.Certificate] | None:
    if not path.is_file():
        report.failed(f"root certificate {path} does not exist (ca.pem from silotune keygen)")
        return None
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        report.failed(f"root certificate {path} is not a PEM certificate")
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            report.failed(
                f"root certificate {path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d}"
                f" to {cert.not_valid_after_utc:%Y-%m-%d}; run silotune keygen again"
            )
            return None
    report.passed(f"root certificate {path} valid until {certs[0].not_valid_after_utc:%Y-%m-%d}")
    return certs


def _check_supernode_key(path: Path, report: CheckReport) -> ec.EllipticCurvePrivateKey | None:
    if not path.is_file():
        report.failed(f"SuperNode key {path} does not exist (supernode.key from silotune keygen)")
        return None
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        report.failed(f"SuperNode key {path} is not an unencrypted OpenSSH private key: {err}")
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        report.failed(f"SuperNode key {path} is not an ECDSA key, which flower-supernode needs")
        return None
    if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        report.failed(f"SuperNode key {path} is readable by other users; chmod 600 {path}")
        return None
    report.passed(f"SuperNode key {path} ({key.curve.name}, private to its owner)")
    return key


def _check_registration(
    superlink: str,
    root_certificates: Path,
    key: ec.EllipticCurvePrivateKey,
    report: CheckReport,
) -> None:
    """Ask the SuperLink to activate this key with an out-of-range heartbeat interval.

    Flower 1.41 looks the key up before it checks the interval, so a registered key is refused
    for the interval (HTTP 400) and an unknown one for activation (412): nothing is activated.
    """
    import httpx
    from flwr.proto.fleet_pb2 import ActivateNodeRequest  # type: ignore[attr-defined]
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    public = key.public_key()
    request = ActivateNodeRequest(public_key=public_key_to_bytes(public), heartbeat_interval=0.0)
    try:
        with FleetHttpClient.from_server_address(
            superlink,
            False,
            root_certificates.read_bytes(),
            interceptors=[NodeAuthHttpInterceptor(key, public)],
        ) as client:
            client.ActivateNode(request)
    except httpx.HTTPStatusError as err:
        code = err.response.status_code
        if code == httpx.codes.BAD_REQUEST:
            report.passed(f"SuperLink {superlink} knows this SuperNode key (TLS verified)")
        elif code == httpx.codes.PRECONDITION_FAILED:
            report.failed(
                f"SuperLink {superlink} does not know this SuperNode key: it is not registered; "
                "the coordinator runs flwr supernode register <this silo's supernode.pub>"
            )
        elif code == httpx.codes.UNAUTHORIZED:
            report.failed(
                f"SuperLink {superlink} refused this SuperNode's signature (is this machine's "
                "clock right?)"
            )
        else:
            report.failed(f"SuperLink {superlink} answered HTTP {code}: {err.response.text[:200]}")
    except httpx.ConnectError as err:
        reason = str(err)
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower():
            report.failed(
                f"SuperLink {superlink}: TLS certificate not trusted by {root_certificates} "
                f"({reason.splitlines()[0][:160]}); use the ca.pem that signed its certificate, "
                "for a name or address its certificate lists"
            )
        else:
            report.failed(f"SuperLink {superlink} not reachable: {reason[:160]}")
    except httpx.HTTPError as err:
        report.failed(f"SuperLink {superlink} not reachable: {err}")
    else:  # a Flower that checks the interval first activated the node; say so plainly
        report.passed(f"SuperLink {superlink} activated this SuperNode key (it is registered)")
