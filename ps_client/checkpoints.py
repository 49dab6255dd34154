"""Cluster checkpoints: the order in which the shards save, commit and restore.

A checkpoint is ``<model_dir>/model.ckpt-<step>``: every shard writes its part
(tables and filters) concurrently, then shard 0 alone writes the manifest and the
``checkpoint`` index, last, so a checkpoint is listed only once it is whole. A
restore is all-or-nothing: shard 0 resolves which checkpoint, every shard checks its
files, and only if all pass do they restore. A checkpoint saved by another shard count
whose filters saved state is refused (FAILED_PRECONDITION) unless ``reset_filters``:
then those filters start empty and the result names them. An export to Monolith's
layout follows the save's order: every shard writes its files, then shard 0 writes
the ``.index`` and ``checkpoint`` files that make the step visible to TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos import ps_service_pb2 as pb
from ps_client.routing import as_global_step
from ps_client.transport import Transport

# The checkpoint RPCs are the admin plane's (``ParameterServerAdmin``); they take the
# data-plane token too, so a trainer's client checkpoints with its own token.


async def save_checkpoint(
    transport: Transport, model_dir: str, global_step: int, max_to_keep: int
) -> str:
    """Save every shard's part, then commit on shard 0.

    :param max_to_keep: older checkpoints beyond this many are deleted (0 = keep all).
    :returns: the prefix ``<model_dir>/model.ckpt-<global_step>``.
    """
    request = pb.AdminSaveRequest(
        model_dir=model_dir, global_step=as_global_step(global_step),
        max_to_keep=int(max_to_keep),
    )
    await transport.each("SaveCheckpoint", request, file_op=True)
    answer = await transport.call(0, "CommitCheckpoint", request, file_op=True)
    return str(answer.prefix)


async def export_checkpoint(
    transport: Transport, model_dir: str, global_step: int, layout: str, num_ps: int
) -> str:
    """Every shard writes its files of the export, then shard 0 checks them all and
    writes ``model.ckpt-<step>.index`` and the ``checkpoint`` index (last).

    :returns: the prefix ``<model_dir>/model.ckpt-<global_step>``.
    """
    request = pb.AdminExportRequest(
        model_dir=model_dir, global_step=as_global_step(global_step), layout=layout,
        num_ps=int(num_ps),
    )
    await transport.each("ExportCheckpoint", request, file_op=True)
    request.commit = True
    answer = await transport.call(0, "ExportCheckpoint", request, file_op=True)
    return str(answer.prefix)


class RestoredCheckpoint(str):
    """The prefix a restore returned (a ``str``, equal to it), which also tells which
    hash filters were reset.

    :ivar reset_filters: the filters whose saved state a restore with
        ``reset_filters=True`` dropped (they started empty), sorted; ``()`` otherwise.
    """

    reset_filters: tuple[str, ...]

    def __new__(cls, prefix: str, reset_filters: tuple[str, ...] = ()) -> RestoredCheckpoint:
        self = super().__new__(cls, prefix)
        self.reset_filters = tuple(reset_filters)
        return self


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_checkpoint` did.

    :param prefix: the restored prefix.
    :param tables: the tables restored (or created from the manifest) on any shard.
    :param reset_filters: the filters reset on any shard (``reset_filters=True``).
    """

    prefix: str
    tables: set[str]
    reset_filters: tuple[str, ...]


async def restore_checkpoint(
    transport: Transport, model_dir: str, prefix: str | None, *, reset_filters: bool = False
) -> Restored | None:
    """Restore ``prefix`` (or the latest checkpoint of ``model_dir``) on every shard.

    :param reset_filters: a checkpoint saved by another shard count restores with its
        file-saving filters emptied instead of being refused.
    :returns: the restored prefix, the names of the tables restored (or created from
        the manifest) and of the filters reset on any shard; None when ``model_dir``
        has no checkpoint.
    """
    probe = pb.AdminRestoreRequest(model_dir=model_dir, prefix=prefix or "",
                                   validate_only=True, missing_ok=True,
                                   reset_filters=reset_filters)
    first = await transport.call(0, "RestoreCheckpoint", probe, file_op=True)
    resolved = str(first.prefix)
    if not resolved:
        return None
    for validate_only in (True, False):
        answers = await transport.each(
            "RestoreCheckpoint",
            pb.AdminRestoreRequest(model_dir=model_dir, prefix=resolved,
                                   validate_only=validate_only, reset_filters=reset_filters),
            file_op=True,
        )
    return Restored(resolved, {n for a in answers for n in a.tables},
                    tuple(sorted({n for a in answers for n in a.reset_filters})))
