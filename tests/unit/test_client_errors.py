"""Status code -> client exception mapping, and the builtin bases docs/api.md promises."""

from __future__ import annotations

import pickle

import grpc
import pytest

from ps_client.errors import (
    ERROR_BY_CODE,
    PsAlreadyExists,
    PsDeadlineExceeded,
    PsError,
    PsFailedPrecondition,
    PsInternal,
    PsInvalidArgument,
    PsNotFound,
    PsUnavailable,
    error_from_rpc,
)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "cls", "builtin"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, PsInvalidArgument, ValueError),
        (grpc.StatusCode.NOT_FOUND, PsNotFound, KeyError),
        (grpc.StatusCode.ALREADY_EXISTS, PsAlreadyExists, ValueError),
        (grpc.StatusCode.FAILED_PRECONDITION, PsFailedPrecondition, ValueError),
        (grpc.StatusCode.UNAVAILABLE, PsUnavailable, ConnectionError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, PsDeadlineExceeded, TimeoutError),
    ],
)
def test_codes_map_to_classes_with_builtin_bases(
    code: grpc.StatusCode, cls: type[PsError], builtin: type[Exception]
) -> None:
    err = error_from_rpc(rpc_error(code, "table 't' is odd"), address="h:1", method="Lookup")
    assert type(err) is cls and isinstance(err, builtin) and isinstance(err, PsError)
    assert (err.code, err.details, err.address, err.method) == (
        code.name, "table 't' is odd", "h:1", "Lookup")
    # str() is the message, not KeyError's repr, and says where it came from.
    assert str(err) == f"table 't' is odd [{code.name} from Lookup on shard h:1]"


def test_unknown_codes_become_internal_keeping_the_code() -> None:
    err = error_from_rpc(rpc_error(grpc.StatusCode.ABORTED, "x"), address="h:1", method="M")
    assert type(err) is PsInternal and err.code == "ABORTED"


def test_every_mapped_class_declares_its_code() -> None:
    assert all(cls.default_code == code for code, cls in ERROR_BY_CODE.items())


def test_client_side_errors_have_no_address_and_pickle() -> None:
    err = PsNotFound("no table named 'nope'")
    assert str(err) == "no table named 'nope'" and err.code == "NOT_FOUND"
    again = pickle.loads(pickle.dumps(PsUnavailable("down", address="h:2", method="Size")))
    assert type(again) is PsUnavailable and again.address == "h:2" and again.method == "Size"
