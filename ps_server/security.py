"""TLS and bearer tokens: who may talk to a shard.

Server side (:mod:`ps_server.server` wires these in):

* :func:`server_credentials`: with ``tls_cert_file``/``tls_key_file`` the gRPC port
  speaks TLS only; with ``tls_client_ca_file`` too, every client must present a
  certificate signed by that CA (mutual TLS). The metrics endpoint uses the same
  files (:func:`ps_server.metrics.start_metrics_server`).
* :class:`TokenAuthInterceptor`: every call of ``monolith_ps.ParameterServer`` must
  carry ``authorization: Bearer <data token>`` (the admin token is accepted too: an
  operator may read and write tables), every call of
  ``monolith_ps.ParameterServerAdmin`` the admin token, except its whole-checkpoint
  RPCs (:data:`protos.contract.CHECKPOINT_RPCS`), which take either token (trainers
  save and restore checkpoints). Health and reflection need none (probes and
  ``grpcurl describe`` keep working). No or a wrong token is ``UNAUTHENTICATED``; the
  data token on the other admin RPCs is ``PERMISSION_DENIED``. An empty token turns
  the check of its service off (the checkpoint RPCs stay checked while either token
  is set). Tokens are compared in
  constant time, and a refused call's request is never parsed.

Client side: :func:`channel_credentials` builds TLS credentials from PEM files (for
``ps-admin`` and the health check; trainers pass ``grpc.ssl_channel_credentials``
to ``PsClient`` themselves) and :func:`bearer_metadata` the token metadata.
"""

from __future__ import annotations

import collections
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from protos import contract
from protos import ps_service_pb2 as ps_pb2
from ps_server.config import ServerConfig
from ps_server.errors import ConfigError

__all__ = [
    "AUTH_METADATA_KEY",
    "Tokens",
    "TokenAuthInterceptor",
    "bearer_metadata",
    "channel_credentials",
    "check_key_matches_cert",
    "load_tokens",
    "read_pem",
    "server_credentials",
    "with_token",
]

_log = logging.getLogger(__name__)

#: Call metadata key carrying ``Bearer <token>``.
AUTH_METADATA_KEY: Final = "authorization"

_DATA_SERVICE: Final = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name
_ADMIN_SERVICE: Final = ps_pb2.DESCRIPTOR.services_by_name["ParameterServerAdmin"].full_name


def read_pem(path: str, what: str) -> bytes:
    """The bytes of PEM file ``path`` (``what`` names the flag in errors).

    :raises ConfigError: unreadable, or no ``-----BEGIN`` block in it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path!r}: {e.strerror or e}") from e
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what}: {path!r} is not PEM (no '-----BEGIN' line)")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC port, or None for plaintext (no ``tls_cert_file``).

    :raises ConfigError: a file cannot be read or is not PEM, or the key is not the
        certificate's (see :func:`check_key_matches_cert`).
    """
    if not config.tls_cert_file:
        return None
    cert = read_pem(config.tls_cert_file, "tls_cert_file")
    key = read_pem(config.tls_key_file, "tls_key_file")
    check_key_matches_cert(config.tls_cert_file, config.tls_key_file)
    client_ca = (
        read_pem(config.tls_client_ca_file, "tls_client_ca_file")
        if config.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def check_key_matches_cert(cert_file: str, key_file: str) -> None:
    """Check at start-up that ``key_file`` is the private key of ``cert_file``'s
    certificate (and that both load): gRPC itself would only report "Failed to bind
    to address" when the server starts.

    :raises ConfigError: naming both files and what is wrong.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callable, so an encrypted key fails instead of prompting on a tty.
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except ssl.SSLError as e:
        text = f"{e.reason or ''} {e}".lower()
        if "mismatch" in text:
            raise ConfigError(
                f"tls_key_file {key_file!r} is not the private key of the certificate in "
                f"tls_cert_file {cert_file!r} (key values mismatch): give the key the "
                "certificate was issued for"
            ) from e
        raise ConfigError(
            f"tls_cert_file {cert_file!r} and tls_key_file {key_file!r} do not load as a "
            f"certificate chain and its unencrypted private key: {e}"
        ) from e
    except OSError as e:
        raise ConfigError(
            f"tls_cert_file {cert_file!r} / tls_key_file {key_file!r}: {e.strerror or e}"
        ) from e


def channel_credentials(
    ca_file: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files.

    :param ca_file: CA bundle that signed the shards' certificates ("" = the system's).
    :param cert_file: client certificate chain for mutual TLS ("" = none); needs
        ``key_file``.
    :raises ConfigError: only one of cert/key given, or a file unreadable or not PEM.
    """
    if bool(cert_file) != bool(key_file):
        raise ConfigError("a client certificate and its key go together: set both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, "CA file") if ca_file else None,
        private_key=read_pem(key_file, "client key file") if key_file else None,
        certificate_chain=read_pem(cert_file, "client certificate file") if cert_file else None,
    )


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (none for an empty token)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class Tokens:
    """The bearer tokens a shard checks ("" = that service is not checked)."""

    data: str = field(default="", repr=False)
    admin: str = field(default="", repr=False)

    @property
    def any(self) -> bool:
        """Whether any service is checked."""
        return bool(self.data or self.admin)


def _read_token(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {path!r}: {e}") from e
    if not token:
        raise ConfigError(f"{what}: {path!r} is empty")
    if any(c.isspace() for c in token):
        raise ConfigError(f"{what}: the token in {path!r} contains whitespace")
    return token


def load_tokens(config: ServerConfig) -> Tokens:
    """The tokens ``config`` sets, read from the token files where given.

    :raises ConfigError: a token file cannot be read, is empty, or holds whitespace
        inside the token.
    """
    data = config.data_token or (
        _read_token(config.data_token_file, "data_token_file") if config.data_token_file else ""
    )
    admin = config.admin_token or (
        _read_token(config.admin_token_file, "admin_token_file")
        if config.admin_token_file else ""
    )
    return Tokens(data=data, admin=admin)


def _presented(metadata: Sequence[Any] | None) -> bytes | None:
    """The token of the call's ``authorization: Bearer`` metadata, or None."""
    for key, value in metadata or ():
        if key != AUTH_METADATA_KEY:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode("utf-8", "surrogateescape")
        return None
    return None


def _matches(presented: bytes, expected: bytes) -> bool:
    return bool(expected) and hmac.compare_digest(presented, expected)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
              ) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends the call with ``code`` without
    parsing the request (no deserializer: the request stays bytes)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every data-plane and admin call (see the module doc).

    :param tokens: the tokens to require; an empty one leaves its service open.
    """

    def __init__(self, tokens: Tokens) -> None:
        self._data = tokens.data.encode("utf-8")
        self._admin = tokens.admin.encode("utf-8")
        self._data_prefix = f"/{_DATA_SERVICE}/"
        self._admin_prefix = f"/{_ADMIN_SERVICE}/"

    def check(self, method: str, metadata: Sequence[Any] | None
              ) -> tuple[grpc.StatusCode, str] | None:
        """Why a call of ``method`` with ``metadata`` is refused: ``(code, message)``,
        or None when it may go ahead."""
        if method.startswith(self._data_prefix):
            service, needed, also = _DATA_SERVICE, self._data, self._admin
        elif method[len(self._admin_prefix):] in contract.CHECKPOINT_RPCS and (
                method.startswith(self._admin_prefix)):
            service, needed, also = _ADMIN_SERVICE, self._admin or self._data, self._data
        elif method.startswith(self._admin_prefix):
            service, needed, also = _ADMIN_SERVICE, self._admin, b""
        else:
            return None  # health, reflection
        if not needed:
            return None
        token = _presented(metadata)
        if token is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"{service} needs a bearer token: send 'authorization: Bearer <token>' "
                "call metadata (PsClient(auth_token=...), ps-admin --token)",
            )
        if _matches(token, needed) or _matches(token, also):
            return None
        if service == _ADMIN_SERVICE and _matches(token, self._data):
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"the data-plane token may not call {service}; use the admin token",
            )
        return (
            grpc.StatusCode.UNAUTHENTICATED,
            f"the bearer token is not valid for {service}",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # UNIMPLEMENTED, whoever asks
        refusal = self.check(handler_call_details.method,
                             handler_call_details.invocation_metadata)
        if refusal is None:
            return handler
        code, message = refusal
        _log.debug("refused %s: %s", handler_call_details.method, code.name)
        return _refusing(handler, code, message)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = (*(details.metadata or ()), *self._metadata)
        return continuation(
            _CallDetails(details.method, details.timeout, metadata, details.credentials,
                         details.wait_for_ready, details.compression),
            request,
        )


def with_token(channel: grpc.Channel, token: str) -> grpc.Channel:
    """``channel`` sending ``authorization: Bearer <token>`` on every unary call
    (``channel`` itself when ``token`` is empty)."""
    if not token:
        return channel
    return grpc.intercept_channel(channel, _BearerToken(token))
