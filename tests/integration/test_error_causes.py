"""Errors that point at their cause (issue 12, class 9), where a user or an operator
meets them: ``ps-server`` processes and the CLI, ``PsClient`` over loopback.

Certificates are made per module with ``cryptography`` (a dev dependency), through
the helpers of ``test_security``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_client import PsClient, PsInvalidArgument
from ps_client.errors import PsNotFound, PsUnavailable
from ps_client.testing import local_cluster
from ps_server.config import ServerConfig
from ps_server.engine import configs
from ps_server.errors import ConfigError
from tests.integration import test_security
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


@dataclasses.dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path
    other_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca_key, ca_cert = test_security._make_ca("test CA", d / "ca.pem")
    test_security._make_leaf(ca_key, ca_cert, "shard", server=True,
                             cert_path=d / "server.pem", key_path=d / "server.key")
    test_security._make_leaf(ca_key, ca_cert, "other", server=True,
                             cert_path=d / "other.pem", key_path=d / "other.key")
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "other.key")


def run_server(*flags: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m ps_server`` with ``flags``, expected to exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "ps_server", "--host=127.0.0.1", "--port=0", *flags],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=timeout,
    )


# ---------------------------------------------------------------- TLS


def test_a_key_that_is_not_the_certificates_is_named_at_start_up(certs: Certs) -> None:
    done = run_server(f"--tls_cert_file={certs.cert}", f"--tls_key_file={certs.other_key}")
    assert done.returncode != 0
    assert (
        f"tls_key_file {str(certs.other_key)!r} is not the private key of the certificate "
        f"in tls_cert_file {str(certs.cert)!r} (key values mismatch)"
    ) in done.stderr, done.stderr
    assert "Failed to bind" not in done.stderr


@pytest.fixture(scope="module")
def tls_cluster(certs: Certs) -> Iterator[list[str]]:
    with local_cluster(1, tls_cert_file=str(certs.cert), tls_key_file=str(certs.key)) as c:
        yield c.addresses


@pytest.fixture(scope="module")
def plain_cluster() -> Iterator[list[str]]:
    with local_cluster(1) as c:
        yield c.addresses


def test_a_plaintext_client_of_a_tls_shard_fails_fast_with_a_hint(
    tls_cluster: list[str], certs: Certs
) -> None:
    start = time.monotonic()
    # The client's cluster check at construction is its first call.
    with pytest.raises(PsUnavailable) as info:
        PsClient(tls_cluster, timeout=30)
    assert time.monotonic() - start < 3  # was ~5 s of retries
    assert info.value.details.endswith(
        "Socket closed; the shard closed the connection before answering: it may speak TLS "
        "(started with tls_cert_file) while this client passed no credentials; pass "
        "credentials=grpc.ssl_channel_credentials(<the shards' CA>)"
    ), info.value.details
    # With credentials the same shard answers.
    creds = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    with PsClient(tls_cluster, timeout=30, credentials=creds) as client:
        assert client.tables() == []


def test_a_tls_client_of_a_plaintext_shard_fails_fast_with_a_hint(
    plain_cluster: list[str], certs: Certs
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    start = time.monotonic()
    with pytest.raises(PsUnavailable) as info:  # at construction: the cluster check
        PsClient(plain_cluster, timeout=30, credentials=creds)
    assert time.monotonic() - start < 3
    assert info.value.details.endswith(
        "; the TLS handshake with the shard failed: the shard may speak plaintext (then pass "
        "no credentials), its certificate may not be signed by the CA in the client's "
        "credentials, or it may require a client certificate (mutual TLS)"
    ), info.value.details
    assert "Tls handshake failed" in info.value.details


# ---------------------------------------------------------------- restore_checkpoint


def test_restore_checkpoint_of_a_directory_without_one_warns_or_raises(
    plain_cluster: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    typo = str(tmp_path / "modle")
    with PsClient(plain_cluster, timeout=30) as client:
        with caplog.at_level(logging.WARNING, logger="ps_client.async_client"):
            assert client.restore_checkpoint(typo) is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.getMessage() for r in warnings] == [
            f"no checkpoint to restore in model_dir {typo!r}: nothing restored, the tables "
            "keep their state"
        ]
        with pytest.raises(PsNotFound) as info:
            client.restore_checkpoint(typo, required=True)
        assert info.value.details == (
            f"no checkpoint to restore in model_dir {typo!r}, and restore_checkpoint was "
            "called with required=True"
        )
        # A directory with a checkpoint restores with or without required=True.
        model = str(tmp_path / "model")
        client.create_table(configs.table_config(2), name="t").assign([1], [[1.0, 2.0]])
        prefix = client.save_checkpoint(model, 7)
        assert client.restore_checkpoint(model, required=True) == prefix
        assert client.table("t").lookup([1]).tolist() == [[1.0, 2.0]]


# ---------------------------------------------------------------- ps-server --help


@pytest.mark.parametrize("program", ["console script", "python -m"])
def test_ps_server_help_lists_every_flag(program: str) -> None:
    if program == "console script":
        script = Path(sys.executable).parent / "ps-server"
        if not script.exists():
            pytest.skip("the ps-server console script is not installed next to python")
        argv = [str(script), "--help"]
    else:
        argv = [sys.executable, "-m", "ps_server", "--help"]
    done = subprocess.run(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    out = done.stdout
    # absl's --help ends with "Try --helpfull..." and status 1; it printed nothing else
    # for the console script before.
    assert done.returncode == 1, done.stderr
    for field in dataclasses.fields(ServerConfig):
        flag = f"--[no]{field.name}:" if field.type in (bool, "bool") else f"--{field.name}:"
        assert flag in out, f"{flag} missing from:\n{out}"
    assert "--[no]allow_non_finite: bool, default=False, accept NaN and infinity" in out
    assert "run one shard until SIGTERM or SIGINT" in out  # the module's docstring


# ---------------------------------------------------------------- dim 0


def test_dim_zero_is_refused(plain_cluster: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        configs.table_config(0)
    assert str(info.value) == "table_config: dim must be a positive integer, got 0"
    assert isinstance(info.value, ValueError)
    config = configs.table_config(4)
    config.entry_config.segments[0].dim_size = 0
    with PsClient(plain_cluster, timeout=30) as client, \
            pytest.raises(PsInvalidArgument, match=r"dim_size must be positive, got 0"):
        client.create_table(config, name="dim0")


# ---------------------------------------------------------------- NOT_FOUND


def test_not_found_names_the_missing_table_or_filter_only(plain_cluster: list[str]) -> None:
    with PsClient(plain_cluster, timeout=30) as client:
        client.create_table(configs.table_config(1), name="secret_table_a")
        client.create_hash_filters(True)
    channel = grpc.insecure_channel(plain_cluster[0])
    try:
        stub = ps_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Size(pb.SizeRequest(table="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "no table named 'nope' on shard 0"
        with pytest.raises(grpc.RpcError) as info:
            stub.InterceptGradient(pb.InterceptGradientRequest(hash_filter="nofilter"),
                                   timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "no hash filter named 'nofilter' on shard 0"
    finally:
        channel.close()
