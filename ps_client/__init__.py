"""Client side of monolith-ps: routing, fan-out, fused ops and learning-rate functions.

:class:`PsClient` is the synchronous client of ``docs/api.md``; :class:`AsyncPsClient` is
the asyncio core it runs on a private thread. Errors raised by either are
:class:`PsError` subclasses (see :mod:`ps_client.errors`).
"""

from ps_client.async_client import AsyncPsClient
from ps_client.async_hash_filters import AsyncHashFilters
from ps_client.async_table import AsyncTable, TableSpec
from ps_client.client import HashFilters, PsClient, Table
from ps_client.errors import (
    PartialWrite,
    PsAlreadyExists,
    PsCancelled,
    PsDataLoss,
    PsDeadlineExceeded,
    PsError,
    PsFailedPrecondition,
    PsInternal,
    PsInvalidArgument,
    PsNotFound,
    PsOutOfRange,
    PsPermissionDenied,
    PsResourceExhausted,
    PsUnauthenticated,
    PsUnavailable,
    PsUnimplemented,
)
from ps_client.learning_rate_functions import LearningRateFunction, PolynomialDecay
from ps_client.transport import RetryPolicy

__all__ = [
    "AsyncHashFilters",
    "AsyncPsClient",
    "AsyncTable",
    "HashFilters",
    "LearningRateFunction",
    "PartialWrite",
    "PolynomialDecay",
    "PsAlreadyExists",
    "PsCancelled",
    "PsClient",
    "PsDataLoss",
    "PsDeadlineExceeded",
    "PsError",
    "PsFailedPrecondition",
    "PsInternal",
    "PsInvalidArgument",
    "PsNotFound",
    "PsOutOfRange",
    "PsPermissionDenied",
    "PsResourceExhausted",
    "PsUnauthenticated",
    "PsUnavailable",
    "PsUnimplemented",
    "RetryPolicy",
    "Table",
    "TableSpec",
]
