"""Tests for TLS material: generation, loading checks, and gRPC streams secured with it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from silotune.errors import SilotuneError
from silotune.transport.base import Connection, TransportError
from silotune.transport.grpc_stream import GrpcStreamServer, connect
from silotune.transport.tls import (
    TlsMaterial,
    TlsMaterialError,
    generate_tls_material,
    load_tls_material,
)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    generate_tls_material(folder, days=30)
    return folder


@pytest.fixture(scope="module")
def other_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("other")
    generate_tls_material(folder)
    return folder


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _echo(conn: Connection) -> None:
    while True:
        conn.send(conn.recv())


# --------------------------------------------------------------------------- generation


def test_generated_server_certificate_chains_to_the_ca(tls_dir: Path) -> None:
    ca, server = _cert(tls_dir / "ca.pem"), _cert(tls_dir / "server.pem")
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    ca.verify_directly_issued_by(ca)  # self-signed
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage


def test_server_certificate_names_dns_and_ip_hosts(tls_dir: Path) -> None:
    san = _cert(tls_dir / "server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_validity_follows_days(tls_dir: Path) -> None:
    cert = _cert(tls_dir / "server.pem")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=10)
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.timezone.utc)


def test_private_keys_are_owner_only(tls_dir: Path) -> None:
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((tls_dir / name).stat().st_mode) == 0o600
    assert sorted(p.name for p in tls_dir.iterdir()) == [
        "ca.key",
        "ca.pem",
        "server.key",
        "server.pem",
    ]


def test_existing_material_is_never_overwritten_silently(tls_dir: Path) -> None:
    before = (tls_dir / "ca.pem").read_bytes()
    with pytest.raises(TlsMaterialError, match="already exists.*overwrite=True"):
        generate_tls_material(tls_dir)
    assert (tls_dir / "ca.pem").read_bytes() == before


def test_overwrite_replaces_material(tmp_path: Path) -> None:
    first = generate_tls_material(tmp_path)
    second = generate_tls_material(tmp_path, overwrite=True)
    assert first.ca_cert_pem != second.ca_cert_pem
    assert (tmp_path / "ca.pem").read_bytes() == second.ca_cert_pem


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hosts": []}, "non-empty"),
        ({"hosts": "localhost"}, "non-empty list"),
        ({"hosts": ["bad host!"]}, "neither an IP address nor a valid DNS name"),
        ({"days": 0}, "days"),
        ({"days": 10_000}, "days"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_tls_material(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- loading


def test_load_returns_what_was_generated(tmp_path: Path) -> None:
    made = generate_tls_material(tmp_path)
    assert load_tls_material(tmp_path) == made
    assert load_tls_material(tmp_path, role="client") == TlsMaterial(made.ca_cert_pem)


def test_client_role_needs_only_the_ca_certificate(tls_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes((tls_dir / "ca.pem").read_bytes())
    assert load_tls_material(tmp_path, role="client").server_key_pem is None
    with pytest.raises(TlsMaterialError, match="server.pem is missing"):
        load_tls_material(tmp_path, role="server")


def test_missing_folder_and_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(TlsMaterialError, match="does not exist"):
        load_tls_material(tmp_path / "nope")
    with pytest.raises(TlsMaterialError, match=r"ca\.pem is missing.*silotune keygen"):
        load_tls_material(tmp_path, role="client")
    assert issubclass(TlsMaterialError, SilotuneError)  # the CLI prints it without a traceback


def test_mismatched_key_is_rejected(tls_dir: Path, other_ca_dir: Path, tmp_path: Path) -> None:
    for name in ("ca.pem", "server.pem"):
        (tmp_path / name).write_bytes((tls_dir / name).read_bytes())
    (tmp_path / "server.key").write_bytes((other_ca_dir / "server.key").read_bytes())
    with pytest.raises(TlsMaterialError, match="does not match the certificate"):
        load_tls_material(tmp_path)


def test_certificate_from_another_ca_is_rejected(
    tls_dir: Path, other_ca_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "ca.pem").write_bytes((tls_dir / "ca.pem").read_bytes())
    for name in ("server.pem", "server.key"):
        (tmp_path / name).write_bytes((other_ca_dir / name).read_bytes())
    with pytest.raises(TlsMaterialError, match="is not signed by the CA"):
        load_tls_material(tmp_path)


def test_garbage_files_are_rejected(tls_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(b"not a certificate")
    with pytest.raises(TlsMaterialError, match="is not a PEM certificate"):
        load_tls_material(tmp_path, role="client")
    for name in ("ca.pem", "server.pem"):
        (tmp_path / name).write_bytes((tls_dir / name).read_bytes())
    (tmp_path / "server.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    with pytest.raises(TlsMaterialError, match="not an unencrypted PEM private key"):
        load_tls_material(tmp_path)


def test_readable_key_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    generate_tls_material(tmp_path)
    (tmp_path / "server.key").chmod(0o644)
    load_tls_material(tmp_path)
    assert "readable by other users" in caplog.text


# --------------------------------------------------------------------------- gRPC over TLS


def test_grpc_stream_over_tls_works_by_ip_and_by_name(tls_dir: Path) -> None:
    server_tls = load_tls_material(tls_dir)
    client_tls = load_tls_material(tls_dir, role="client")
    with GrpcStreamServer(_echo, tls=server_tls) as srv:
        for target in (srv.target, f"localhost:{srv.port}"):
            with connect(target, tls=client_tls, timeout=5) as conn:
                payload = b"secret" * 1_000_000  # 6 MB: several chunks
                conn.send(payload)
                assert conn.recv(timeout=10) == payload


def test_client_trusting_another_ca_fails_clearly(tls_dir: Path, other_ca_dir: Path) -> None:
    with GrpcStreamServer(_echo, tls=load_tls_material(tls_dir)) as srv:
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED") as info:
            connect(srv.target, tls=load_tls_material(other_ca_dir, role="client"), timeout=5)
        assert "does not verify against the given CA" in str(info.value)
        with connect(srv.target, tls=load_tls_material(tls_dir, role="client")) as conn:
            conn.send(b"server still fine")
            assert conn.recv(timeout=5) == b"server still fine"


def test_host_outside_the_certificate_is_refused_unless_named(tmp_path: Path) -> None:
    material = generate_tls_material(tmp_path, hosts=["trunk.internal"])
    with GrpcStreamServer(_echo, tls=material) as srv:
        with pytest.raises(TransportError, match="Cannot open a byte stream"):
            connect(srv.target, tls=material, timeout=5)
        with connect(srv.target, tls=material, server_name="trunk.internal", timeout=5) as conn:
            conn.send(b"ok")
            assert conn.recv(timeout=5) == b"ok"


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_dir: Path) -> None:
    with GrpcStreamServer(_echo, tls=load_tls_material(tls_dir)) as srv:
        with pytest.raises(TransportError, match="UNAVAILABLE"):
            connect(srv.target, insecure=True, timeout=5)


def test_server_refuses_client_only_material(tls_dir: Path) -> None:
    with pytest.raises(ValueError, match="no server certificate"):
        GrpcStreamServer(_echo, tls=load_tls_material(tls_dir, role="client"))
