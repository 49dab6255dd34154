"""Security (issue 7 item 5): TLS, mutual TLS, bearer tokens, paths inside the data root.

Certificates are made here, per test module, with ``cryptography``: a CA, a server
certificate for 127.0.0.1/localhost, a client certificate, and a second ("rogue")
CA with its own client certificate. No key is committed.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_client import PsClient, RetryPolicy
from ps_client.errors import (
    PsPermissionDenied,
    PsUnauthenticated,
    PsUnavailable,
)
from ps_client.testing import local_cluster
from ps_server import admin_cli, healthcheck
from ps_server.config import ServerConfig
from ps_server.engine import configs
from ps_server.engine.shard import Shard
from ps_server.errors import ConfigError
from ps_server.metrics import ShardMetrics, start_metrics_server
from ps_server.security import load_tokens
from tests.integration.conftest import CLIENT_OPTIONS, start_inprocess_server
from tests.integration.test_service import assign, lookup, make_table

pytestmark = pytest.mark.integration

Code = grpc.StatusCode
DATA = "data-3f9c1e"
ADMIN = "admin-8b27d4"


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path

    def read(self, path: Path) -> bytes:
        return path.read_bytes()

    def channel_credentials(self, *, ca: Path | None = None, client: bool = False,
                            rogue_client: bool = False) -> grpc.ChannelCredentials:
        cert, key = (
            (self.client_cert, self.client_key) if client
            else (self.rogue_client_cert, self.rogue_client_key) if rogue_client
            else (None, None)
        )
        return grpc.ssl_channel_credentials(
            root_certificates=(ca or self.ca).read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )


def _name(cn: str) -> Any:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: Any, path: Path) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))


def _write_cert(cert: Any, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: str, issuer: Any, public_key: Any) -> Any:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _make_ca(cn: str, out: Path) -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(cn, _name(cn), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_cert(cert, out)
    return key, cert


def _make_leaf(ca_key: Any, ca_cert: Any, cn: str, *, server: bool, cert_path: Path,
               key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(cn, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
    _write_cert(builder.sign(ca_key, hashes.SHA256()), cert_path)
    _write_key(key, key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _make_ca("monolith-ps test CA", d / "ca.pem")
    rogue_key, rogue_cert = _make_ca("rogue CA", d / "rogue_ca.pem")
    _make_leaf(ca_key, ca_cert, "shard", server=True, cert_path=d / "server.pem",
               key_path=d / "server.key")
    _make_leaf(ca_key, ca_cert, "trainer", server=False, cert_path=d / "client.pem",
               key_path=d / "client.key")
    _make_leaf(rogue_key, rogue_cert, "intruder", server=False,
               cert_path=d / "rogue_client.pem", key_path=d / "rogue_client.key")
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
               d / "client.key", d / "rogue_ca.pem", d / "rogue_client.pem",
               d / "rogue_client.key")


@contextlib.contextmanager
def secure_channel(port: int, credentials: grpc.ChannelCredentials) -> Iterator[grpc.Channel]:
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=CLIENT_OPTIONS)
    try:
        yield channel
    finally:
        channel.close()


def list_tables(channel: grpc.Channel, token: str | None = None) -> list[str]:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    answer = ps_grpc.ParameterServerStub(channel).ListTables(
        pb.ListTablesRequest(), timeout=10, metadata=metadata)
    return list(answer.names)


def expect(code: grpc.StatusCode, call: Callable[[], Any], *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    details = str(err.details())
    assert err.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return details


# ---------------------------------------------------------------- TLS


def test_tls_shard_answers_clients_that_trust_its_ca(pki: Pki) -> None:
    with start_inprocess_server(tls_cert_file=str(pki.server_cert),
                                tls_key_file=str(pki.server_key)) as srv:
        with secure_channel(srv.port, pki.channel_credentials()) as channel:
            assert list_tables(channel) == []
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING)
        # Plaintext and a client trusting another CA never reach the service.
        expect(Code.UNAVAILABLE, lambda: list_tables(srv.channel))
        with secure_channel(srv.port, pki.channel_credentials(ca=pki.rogue_ca)) as channel:
            expect(Code.UNAVAILABLE, lambda: list_tables(channel))


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(pki: Pki) -> None:
    with start_inprocess_server(tls_cert_file=str(pki.server_cert),
                                tls_key_file=str(pki.server_key),
                                tls_client_ca_file=str(pki.ca)) as srv:
        with secure_channel(srv.port, pki.channel_credentials(client=True)) as channel:
            assert list_tables(channel) == []
        for creds in (pki.channel_credentials(), pki.channel_credentials(rogue_client=True)):
            with secure_channel(srv.port, creds) as channel:
                expect(Code.UNAVAILABLE, lambda channel=channel: list_tables(channel))


def test_tls_files_that_are_not_pem_are_a_config_error(tmp_path: Path, pki: Pki) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls_cert_file: .* is not PEM"), \
            start_inprocess_server(tls_cert_file=str(bogus), tls_key_file=str(pki.server_key)):
        pass
    with pytest.raises(ConfigError, match="tls_client_ca_file: cannot read"), \
            start_inprocess_server(tls_cert_file=str(pki.server_cert),
                                   tls_key_file=str(pki.server_key),
                                   tls_client_ca_file=str(tmp_path / "missing.pem")):
        pass


def _https_get(url: str, context: ssl.SSLContext | None) -> str:
    with urllib.request.urlopen(url, timeout=10, context=context) as answer:
        return str(answer.read().decode())


def test_metrics_endpoint_speaks_tls_and_checks_client_certificates(pki: Pki) -> None:
    metrics = ShardMetrics(Shard(), process_metrics=False)
    server = start_metrics_server(metrics, "127.0.0.1", 0, certfile=str(pki.server_cert),
                                  keyfile=str(pki.server_key), client_cafile=str(pki.ca))
    try:
        url = f"https://127.0.0.1:{server.port}/metrics"
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        # A connection that never starts its handshake does not hold up the others.
        with socket.create_connection(("127.0.0.1", server.port)):
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                _https_get(url, trusting)  # no client certificate
            trusting.load_cert_chain(str(pki.client_cert), str(pki.client_key))
            assert "monolith_ps_shard_info" in _https_get(url, trusting)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _https_get(f"http://127.0.0.1:{server.port}/metrics", None)
        assert "monolith_ps_shard_info" in _https_get(url, trusting)  # still serving
    finally:
        server.stop()


# ---------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def guarded() -> Iterator[Any]:
    with start_inprocess_server(data_token=DATA, admin_token=ADMIN) as srv:
        yield srv


def _call(srv: Any, service: str, token: str | None) -> Any:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    if service == "data":
        return ps_grpc.ParameterServerStub(srv.channel).ListTables(
            pb.ListTablesRequest(), timeout=10, metadata=metadata)
    return ps_grpc.ParameterServerAdminStub(srv.channel).Stats(
        pb.StatsRequest(), timeout=10, metadata=metadata)


@pytest.mark.parametrize(
    ("service", "token", "code", "words"),
    [
        ("data", None, Code.UNAUTHENTICATED, "monolith_ps.ParameterServer needs a bearer token"),
        ("data", "wrong", Code.UNAUTHENTICATED, "not valid for monolith_ps.ParameterServer"),
        ("data", DATA, Code.OK, ""),
        ("data", ADMIN, Code.OK, ""),  # operators may use the data plane
        ("admin", None, Code.UNAUTHENTICATED, "ParameterServerAdmin needs a bearer token"),
        ("admin", "wrong", Code.UNAUTHENTICATED, "not valid for monolith_ps.ParameterServerAdmin"),
        ("admin", DATA, Code.PERMISSION_DENIED, "data-plane token may not call"),
        ("admin", ADMIN, Code.OK, ""),
    ],
)
def test_token_matrix(guarded: Any, service: str, token: str | None, code: grpc.StatusCode,
                      words: str) -> None:
    if code == Code.OK:
        _call(guarded, service, token)
    else:
        expect(code, lambda: _call(guarded, service, token), words)


def _restore_nothing(srv: Any, token: str | None) -> Any:
    """A whole-checkpoint RPC (admin plane) that changes nothing: no checkpoint there."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    return ps_grpc.ParameterServerAdminStub(srv.channel).RestoreCheckpoint(
        pb.AdminRestoreRequest(model_dir="/nonexistent-model-dir", missing_ok=True),
        timeout=10, metadata=metadata)


@pytest.mark.parametrize(
    ("token", "code"),
    [(None, Code.UNAUTHENTICATED), ("wrong", Code.UNAUTHENTICATED), (DATA, Code.OK),
     (ADMIN, Code.OK)],
)
def test_checkpoint_rpcs_take_either_token(guarded: Any, token: str | None,
                                           code: grpc.StatusCode) -> None:
    # Trainers save and restore whole checkpoints with their data-plane token; the other
    # admin RPCs refuse it (test_token_matrix).
    if code == Code.OK:
        assert _restore_nothing(guarded, token).prefix == ""
    else:
        expect(code, lambda: _restore_nothing(guarded, token), "ParameterServerAdmin")


def test_checkpoint_rpcs_stay_checked_with_only_a_data_token() -> None:
    with start_inprocess_server(data_token=DATA) as srv:
        expect(Code.UNAUTHENTICATED, lambda: _restore_nothing(srv, None), "bearer token")
        assert _restore_nothing(srv, DATA).prefix == ""
        _call(srv, "admin", None)  # Stats: the admin plane is open without an admin token


def test_token_edge_cases(guarded: Any) -> None:
    stub = ps_grpc.ParameterServerStub(guarded.channel)

    def with_metadata(*metadata: tuple[str, str]) -> Any:
        return stub.ListTables(pb.ListTablesRequest(), timeout=10, metadata=metadata)

    expect(Code.UNAUTHENTICATED, lambda: with_metadata(("authorization", f"Basic {DATA}")))
    expect(Code.UNAUTHENTICATED, lambda: with_metadata(("authorization", "Bearer")))
    expect(Code.UNAUTHENTICATED, lambda: with_metadata(("x-token", DATA)))
    expect(Code.UNAUTHENTICATED, lambda: with_metadata(("authorization", f"Bearer {DATA}x")))
    with_metadata(("authorization", f"bearer {DATA}"))  # the scheme is case-insensitive
    # Health and reflection need no token.
    health = health_pb2_grpc.HealthStub(guarded.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING)
    # A refused call's request is never parsed: garbage without a token is
    # UNAUTHENTICATED, with a token the parser sees it (INVALID_ARGUMENT).
    raw = guarded.channel.unary_unary("/monolith_ps.ParameterServer/Lookup")
    garbage = b"\x0a\xff\xff\xff\xff\x0f"
    expect(Code.UNAUTHENTICATED, lambda: raw(garbage, timeout=10))
    expect(Code.INVALID_ARGUMENT,
           lambda: raw(garbage, timeout=10, metadata=(("authorization", f"Bearer {DATA}"),)))


@pytest.mark.parametrize(
    ("tokens", "open_service"),
    [({"data_token": DATA}, "admin"), ({"admin_token": ADMIN}, "data")],
)
def test_an_empty_token_leaves_its_service_unchecked(tokens: dict[str, str],
                                                     open_service: str) -> None:
    closed = "data" if open_service == "admin" else "admin"
    with start_inprocess_server(**tokens) as srv:
        _call(srv, open_service, None)
        expect(Code.UNAUTHENTICATED, lambda: _call(srv, closed, None))


def test_tokens_from_files(tmp_path: Path) -> None:
    (tmp_path / "data").write_text(f"  {DATA}\n")
    (tmp_path / "admin").write_text(f"{ADMIN}\n")
    config = ServerConfig(data_token_file=str(tmp_path / "data"),
                          admin_token_file=str(tmp_path / "admin"))
    tokens = load_tokens(config)
    assert (tokens.data, tokens.admin) == (DATA, ADMIN)
    assert DATA not in repr(tokens)
    with start_inprocess_server(data_token_file=str(tmp_path / "data")) as srv:
        _call(srv, "data", DATA)
        expect(Code.UNAUTHENTICATED, lambda: _call(srv, "data", None))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"data_token_file: .* is empty"):
        load_tokens(ServerConfig(data_token_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="admin_token_file: cannot read"):
        load_tokens(ServerConfig(admin_token_file=str(tmp_path / "missing")))


# ---------------------------------------------------------------- a TLS cluster


def test_cluster_over_mutual_tls_with_tokens(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "data_token").write_text(DATA + "\n")
    (tmp_path / "admin_token").write_text(ADMIN + "\n")
    tls = {
        "tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key),
        "tls_client_ca_file": str(pki.ca),
    }
    with local_cluster(2, data_token_file=str(tmp_path / "data_token"),
                       admin_token_file=str(tmp_path / "admin_token"), **tls) as cluster:
        addresses = cluster.addresses
        creds = pki.channel_credentials(client=True)
        with PsClient(addresses, credentials=creds, auth_token=DATA) as client:
            table = client.create_table(configs.table_config(2), name="emb")
            ids = np.array([1, 2, 3, -4], dtype=np.int64)
            values = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=np.float32)
            table.assign(ids, values)
            np.testing.assert_array_equal(table.lookup(ids), values)
        # Refused at construction: the client's cluster check is its first call.
        with pytest.raises(PsUnauthenticated, match="needs a bearer token"):
            PsClient(addresses, credentials=creds, timeout=10)
        # A refused handshake is UNAVAILABLE at once: one attempt, no retry, and a
        # deadline far beyond it (a slow machine must not turn it into DEADLINE_EXCEEDED).
        once = RetryPolicy(max_attempts=1)
        with pytest.raises(PsUnavailable):  # no client certificate
            PsClient(addresses, credentials=pki.channel_credentials(), auth_token=DATA,
                     timeout=60, retry=once)
        with pytest.raises(PsUnavailable):  # plaintext
            PsClient(addresses, auth_token=DATA, timeout=60, retry=once)

        # ps-admin over mutual TLS with the admin token (from a file), and refused
        # with the data token.
        (tmp_path / "model").mkdir()
        base = [f"--addresses={','.join(addresses)}", f"--tls_ca_file={pki.ca}",
                f"--tls_cert_file={pki.client_cert}", f"--tls_key_file={pki.client_key}"]
        out, err = io.StringIO(), io.StringIO()
        status = admin_cli.run([*base, f"--token_file={tmp_path / 'admin_token'}", "stats",
                                "--json"], out=out, err=err)
        assert status == 0, err.getvalue()
        shards = json.loads(out.getvalue())["shards"]
        assert [s["entries"] for s in shards] == [2, 2]  # floormod: 2, -4 | 1, 3
        out, err = io.StringIO(), io.StringIO()
        assert admin_cli.run([*base, f"--token={DATA}", "stats"], out=out, err=err) == 1
        assert "PERMISSION_DENIED" in err.getvalue()
        out, err = io.StringIO(), io.StringIO()
        assert admin_cli.run([*base, "stats"], out=out, err=err) == 1
        assert "UNAUTHENTICATED" in err.getvalue()

        # The health check over TLS, no token needed.
        serving, detail = healthcheck.probe(
            addresses[0], credentials=pki.channel_credentials(client=True))
        assert (serving, detail) == (True, "SERVING")
        assert healthcheck.main([f"--address={addresses[1]}", f"--tls_ca_file={pki.ca}",
                                 f"--tls_cert_file={pki.client_cert}",
                                 f"--tls_key_file={pki.client_key}",
                                 "--tls_server_name=localhost"]) == 0
        serving, detail = healthcheck.probe(addresses[0], timeout=60)  # plaintext
        assert not serving and detail.startswith("UNAVAILABLE")


def test_client_maps_permission_denied_of_a_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with local_cluster(1, data_root=str(root)) as cluster, \
            PsClient(cluster.addresses, timeout=10) as client:
        client.create_table(configs.table_config(2), name="emb")
        with pytest.raises(PsPermissionDenied, match="outside the data root"):
            client.save_checkpoint(str(tmp_path / "elsewhere"), 1)


# ---------------------------------------------------------------- paths


@pytest.fixture
def rooted(tmp_path: Path) -> Iterator[tuple[Any, Path, Path]]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)  # a link inside the root leading out of it
    with start_inprocess_server(data_root=str(root)) as srv:
        make_table(srv.stub, "t", configs.table_config(2))
        assign(srv.stub, "t", [1, 2], [[1, 1], [2, 2]])
        yield srv, root, outside


ESCAPES = ["../outside/x", "../../etc/x", "escape/x", "sub/../../outside/x"]


def test_data_plane_paths_stay_inside_the_data_root(rooted: tuple[Any, Path, Path]) -> None:
    srv, _, outside = rooted
    stub = srv.stub
    admin = ps_grpc.ParameterServerAdminStub(srv.channel)  # whole checkpoints
    for path in [*ESCAPES, str(outside / "x"), "/etc/x"]:
        for call in (
            lambda p=path: stub.SaveTable(pb.SaveRequest(table="t", basename=p)),
            lambda p=path: stub.RestoreTable(pb.RestoreRequest(table="t", basename=p)),
            lambda p=path: admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir=p)),
            lambda p=path: admin.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir=p)),
        ):
            expect(Code.PERMISSION_DENIED, call, repr(path), "outside the data root")
    assert os.listdir(outside) == []
    np.testing.assert_array_equal(lookup(stub, "t", [1, 2]), [[1, 1], [2, 2]])


def test_admin_paths_stay_inside_the_data_root(rooted: tuple[Any, Path, Path]) -> None:
    srv, root, outside = rooted
    admin = ps_grpc.ParameterServerAdminStub(srv.channel)
    for path in [*ESCAPES, str(outside), "/etc"]:
        expect(Code.PERMISSION_DENIED,
               lambda p=path: admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir=p, global_step=1)),
               "outside the data root")
        expect(Code.PERMISSION_DENIED,
               lambda p=path: admin.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir=p)),
               "outside the data root")
        expect(Code.PERMISSION_DENIED,
               lambda p=path: admin.RestoreCheckpoint(
                   pb.AdminRestoreRequest(model_dir="m", prefix=p)),
               "outside the data root")
    assert os.listdir(outside) == []

    # A checkpoint index inside the root naming a checkpoint outside it: refused too.
    admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=3))
    admin.CommitCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=3))
    (root / "m" / "checkpoint").write_text(
        f'model_checkpoint_path: "{outside}/model.ckpt-3"\n')
    expect(Code.PERMISSION_DENIED,
           lambda: admin.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir="m")),
           "the latest checkpoint of 'm'", "outside the data root")
    # A bare prefix names a checkpoint of model_dir (inside the root): it restores.
    restored = admin.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir="m", prefix="model.ckpt-3"))
    assert restored.prefix == str(root / "m" / "model.ckpt-3")
    assert restored.entries == 2
