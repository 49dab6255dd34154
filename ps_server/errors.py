"""The failures the shard can report, named for the domain.

Every error a user can cause derives from :class:`ShardError`. The gRPC layer maps
each class to one status code (``ps_server.service``); the engine and the
checkpoint code raise these and never import grpc. Messages name what they are
about (the table, the file, the expected and the actual shape) so a person can
act on them. Raising one of these always happens *before* any state changes.
"""

from __future__ import annotations


class ShardError(Exception):
    """Base of every user-facing monolith-ps error."""


class InvalidArgumentError(ShardError, ValueError):
    """The request itself is wrong: shapes, dtypes, values or config fields."""


class DimMismatchError(InvalidArgumentError):
    """An array's shape does not match the table (ids vs rows, dims vs config)."""


class BadTensorError(InvalidArgumentError):
    """An array cannot be converted (e.g. ids not int64-convertible, NaN where refused)."""


class ConfigError(InvalidArgumentError):
    """A table, optimizer, initializer, compressor or filter config is invalid."""


class NotFoundError(ShardError, LookupError):
    """Something named in the request does not exist."""


class UnknownTableError(NotFoundError):
    """No table of that name on this shard."""


class UnknownFilterError(NotFoundError):
    """No hash filter of that name on this shard."""


class CheckpointNotFoundError(NotFoundError):
    """A restore found no files for the given basename or checkpoint."""


class AlreadyExistsError(ShardError):
    """Creating something that exists already with a different definition."""


class FailedPreconditionError(ShardError):
    """The request is well formed but the state does not allow it."""


class ServingEntryError(FailedPreconditionError):
    """An operation that needs TRAINING entries was called on a SERVING table."""


class ConfigMismatchError(FailedPreconditionError):
    """Files or state disagree with the live configuration (e.g. checkpoint dims)."""


class CheckpointCorruptError(ShardError):
    """A checkpoint file is damaged: bad CRC, truncated record, unparsable data."""


class PathOutsideRootError(ShardError):
    """A save/restore path escapes the configured data root."""


class ResourceExhaustedError(ShardError):
    """A configured limit (entries, bytes, batch size) would be exceeded."""
