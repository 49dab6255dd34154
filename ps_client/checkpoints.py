"""Cluster checkpoints: the order in which the shards save, commit and restore.

A checkpoint is ``<model_dir>/model.ckpt-<step>``: every shard writes its part
(tables and filters) concurrently, then shard 0 alone writes the manifest and the
``checkpoint`` index, last, so a checkpoint is listed only once it is whole. A
restore is all-or-nothing: shard 0 resolves which checkpoint, every shard checks its
files, and only if all pass do they restore.
"""

from __future__ import annotations

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


async def restore_checkpoint(
    transport: Transport, model_dir: str, prefix: str | None
) -> tuple[str, set[str]] | None:
    """Restore ``prefix`` (or the latest checkpoint of ``model_dir``) on every shard.

    :returns: the restored prefix and the names of the tables restored (or created
        from the manifest) on any shard; None when ``model_dir`` has no checkpoint.
    """
    probe = pb.AdminRestoreRequest(model_dir=model_dir, prefix=prefix or "",
                                   validate_only=True, missing_ok=True)
    first = await transport.call(0, "RestoreCheckpoint", probe, file_op=True)
    resolved = str(first.prefix)
    if not resolved:
        return None
    for validate_only in (True, False):
        answers = await transport.each(
            "RestoreCheckpoint",
            pb.AdminRestoreRequest(model_dir=model_dir, prefix=resolved,
                                   validate_only=validate_only),
            file_op=True,
        )
    return resolved, {n for a in answers for n in a.tables}
