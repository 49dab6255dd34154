"""Ask a shard's gRPC health service whether it is serving; the container health check.

    python -m ps_server.healthcheck [--address=HOST:PORT] [--service=NAME] [--timeout=SECONDS]
        [--tls_ca_file=PEM [--tls_server_name=NAME] [--tls_cert_file=PEM --tls_key_file=PEM]]

Exit status 0 when the shard answers ``SERVING``; 1 for anything else: ``NOT_SERVING``
(for example while it drains after SIGTERM), an unknown service name, no answer within
the timeout, or nothing listening. One line saying what was seen goes to stdout (0) or
stderr (1); Docker keeps it in ``docker inspect``'s health log.

The address defaults to ``$PS_HEALTHCHECK_ADDRESS``, else ``127.0.0.1:50051`` (the
image's port). Kubernetes does not need this module: its probes speak
``grpc.health.v1.Health`` natively, in plaintext only.

A shard serving TLS (``--tls_cert_file``) is probed with ``--tls_ca_file`` (and a
client certificate under mutual TLS); each TLS flag defaults to an environment
variable (``$PS_HEALTHCHECK_TLS_CA_FILE``, ``..._SERVER_NAME``, ``..._CERT_FILE``,
``..._KEY_FILE``), so the image's ``HEALTHCHECK`` works with ``docker run -e``.
``--tls_server_name`` is the name to verify the certificate against when it does
not list the probed address (e.g. ``127.0.0.1``). The health service needs no token.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps_server.errors import ConfigError
from ps_server.security import channel_credentials

__all__ = ["ADDRESS_ENV", "DEFAULT_ADDRESS", "TLS_ENV_PREFIX", "main", "probe"]

#: Environment variable read for the default ``--address``.
ADDRESS_ENV = "PS_HEALTHCHECK_ADDRESS"
#: Address probed when neither ``--address`` nor ``$PS_HEALTHCHECK_ADDRESS`` is given.
DEFAULT_ADDRESS = "127.0.0.1:50051"
#: ``--tls_x`` defaults to ``$PS_HEALTHCHECK_TLS_X`` (upper case).
TLS_ENV_PREFIX = "PS_HEALTHCHECK_TLS_"


def probe(
    address: str,
    *,
    service: str = "",
    timeout: float = 3.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> tuple[bool, str]:
    """Call ``grpc.health.v1.Health/Check`` once on ``address``.

    Args:
        address: ``host:port`` of the shard.
        service: the health service name to ask about; ``""`` is the whole server.
        timeout: seconds allowed for connecting and answering together.
        credentials: TLS channel credentials (None = plaintext).
        server_name: with TLS, the name the certificate must carry ("" = the
            address's host).

    Returns:
        ``(serving, detail)``: ``serving`` is True only for a ``SERVING`` answer;
        ``detail`` is the status name (``"SERVING"``, ``"NOT_SERVING"``, ...) or, when
        the call failed, the gRPC status code and message. Never raises for an
        unreachable or unhealthy server.
    """
    request = health_pb2.HealthCheckRequest(service=service)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (
        grpc.insecure_channel(address) if credentials is None
        else grpc.secure_channel(address, credentials, options=options)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(request, timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            name = code.name if code is not None else "UNKNOWN"
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            return False, f"{name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probe as a command; return the process exit status (0 serving, 1 not)."""
    parser = argparse.ArgumentParser(
        prog="python -m ps_server.healthcheck",
        description="Exit 0 if the shard's gRPC health service answers SERVING, else 1.",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
        help=f"host:port to probe (default: ${ADDRESS_ENV} or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--service", default="", help='health service name ("" = the whole server)'
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer"
    )
    for name, help_text in (
        ("ca_file", "PEM CA bundle that signed the shard's certificate: probe with TLS"),
        ("server_name", "name the shard's certificate must carry (default: the host probed)"),
        ("cert_file", "PEM client certificate, for a shard requiring mutual TLS"),
        ("key_file", "PEM key of --tls_cert_file"),
    ):
        env = f"{TLS_ENV_PREFIX}{name.upper()}"
        parser.add_argument(f"--tls_{name}", default=os.environ.get(env, ""),
                            help=f"{help_text} (default: ${env})")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    credentials = None
    if args.tls_ca_file:
        try:
            credentials = channel_credentials(
                args.tls_ca_file, args.tls_cert_file, args.tls_key_file
            )
        except ConfigError as e:
            parser.error(str(e))
    elif args.tls_cert_file or args.tls_key_file or args.tls_server_name:
        parser.error("--tls_cert_file, --tls_key_file and --tls_server_name need --tls_ca_file")
    serving, detail = probe(args.address, service=args.service, timeout=args.timeout,
                            credentials=credentials, server_name=args.tls_server_name)
    line = f"{args.address} service={args.service!r}: {detail}"
    print(line, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
