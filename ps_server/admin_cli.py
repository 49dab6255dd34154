"""``ps-admin``: operate a monolith-ps cluster through every shard's admin service.

    ps-admin --addresses=HOST:PORT,HOST:PORT,... [--shards=I,J,...] [--timeout=SECONDS]
             [--tls_ca_file=PEM [--tls_cert_file=PEM --tls_key_file=PEM]]
             [--token_file=PATH | --token=TOKEN] COMMAND ...

    save     --model_dir=DIR --global_step=N [--max_to_keep=K]
    restore  --model_dir=DIR [--prefix=model.ckpt-N] [--validate_only] [--reset_filters]
    export   --model_dir=DIR --global_step=N [--layout=monolith|monolith-multi] [--num_ps=P]
    evict    [--table=NAME]
    stats    [--json]
    drain    [--grace_seconds=S]

The addresses are the shards in shard order (address ``i`` is shard ``i``), as the
trainers list them. Before any command every address is asked who it is (its shard
index, the shard count and its cluster id): address ``i`` must be shard ``i``, every
shard must count as many shards as there are addresses, and every shard that has a
cluster id must have the same one. Otherwise nothing is done: the exit status is 1
and stderr lists what each address said. ``--shards=I,J,...`` operates on part of a
cluster instead, e.g. restoring one crashed shard: it gives the index of each listed
address, which must say so; all of them must agree on the count and the cluster id
(``save`` refuses a partial list: a save must reach every shard). "shard i" in the
output is always the index the shard reported.

Every command calls ``monolith_ps.ParameterServerAdmin`` on the listed shards at once:

* ``save``: every shard writes its part of ``<model_dir>/model.ckpt-<global_step>``;
  when all succeeded, shard 0 (the address that reported index 0) writes the manifest
  and the ``checkpoint`` index, which names the highest committed step as the latest
  (``max_to_keep`` > 0 keeps that many of the highest steps; a step below them is
  refused rather than deleted at once).
* ``restore``: every shard validates the checkpoint (the latest, or ``--prefix``)
  first; only when all passed does every shard restore it, so a damaged checkpoint
  changes nothing anywhere. Tables missing on a shard are created from the
  manifest; a checkpoint saved by any number of shards can be restored (filter state
  only into the same number: otherwise refused unless ``--reset_filters``, which
  restores the tables, empties those filters and prints which, per shard).
* ``export``: every shard writes ``<model_dir>/model.ckpt-<global_step>`` in Monolith's
  files for a job with ``--num_ps`` parameter servers (0 = a single-process job;
  ``--layout=monolith``: a HashTable per table, ``monolith-multi``: native
  MultiHashTable); when all succeeded, shard 0 checks every file and writes
  ``model.ckpt-<step>.index`` and the ``checkpoint`` index, so TensorFlow's
  ``latest_checkpoint`` names the step (docs/monolith-migration.md).
* ``evict``: delete expired entries now; ``stats``: sizes, filters, last
  save/restore per shard (``--json``: machine-readable); ``drain``: take the shards
  out of service before maintenance (see the Drain RPC).

While shards work, one status line per shard shows what it is doing and how long it
has taken, updated in place on a terminal; otherwise a plain line is printed as each
shard finishes. Exit status: 0 when every shard succeeded; 1 otherwise, with the
failing shard, its address and the gRPC status on stderr (or, when the addresses are
not the shards they should be, what each said); 2 for a usage error.

Shards started with ``--tls_cert_file`` need ``--tls_ca_file`` (the CA that signed
their certificates; ``--tls_cert_file``/``--tls_key_file`` too under mutual TLS).
Shards started with an admin token need it: ``--token_file``, ``--token`` or
``$PS_ADMIN_TOKEN`` (a token given on the command line shows in the process list).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import grpc
from google.protobuf.message import Message

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from protos.cluster import ShardIdentity, identity_mismatch
from ps_server.errors import ConfigError
from ps_server.security import channel_credentials, with_token

__all__ = ["AdminCommandError", "main"]

_T = TypeVar("_T")

#: Large enough for a Stats answer of many tables.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
#: Environment variable read for the default ``--token``.
TOKEN_ENV = "PS_ADMIN_TOKEN"


class AdminCommandError(Exception):
    """A command failed on at least one shard (the message says where and why)."""


# ---------------------------------------------------------------- formatting


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _rpc_error(err: grpc.RpcError) -> str:
    if isinstance(err, grpc.Call):
        return f"{err.code().name}: {err.details()}"
    return str(err)


def plain(message: Message) -> dict[str, Any]:
    """A message as JSON-ready Python values, every field present, numbers as numbers
    (``json_format`` would write 64-bit integers as strings)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            if field.is_repeated:
                out[field.name] = [plain(v) for v in value]
            else:
                out[field.name] = plain(value) if message.HasField(field.name) else None
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


# ---------------------------------------------------------------- progress


class Progress:
    """One status line per shard, redrawn in place on a terminal.

    Off a terminal nothing is redrawn: :meth:`finish` prints the shard's final line
    as soon as it is known.
    """

    def __init__(self, stream: TextIO, addresses: Sequence[str], *, tty: bool,
                 quiet: bool = False, labels: Sequence[int] | None = None) -> None:
        self._stream = stream
        self._addresses = list(addresses)
        #: The shard index shown on each line (default: the line number).
        self._labels = list(range(len(addresses))) if labels is None else list(labels)
        self._tty = tty
        self._quiet = quiet
        self._width = max(len(a) for a in addresses)
        self._status = ["waiting"] * len(addresses)
        self._started = [0.0] * len(addresses)
        self._done = [True] * len(addresses)
        self._drawn = 0

    def _line(self, i: int) -> str:
        status = self._status[i]
        if not self._done[i]:
            status += f" {time.monotonic() - self._started[i]:.1f}s"
        return f"shard {self._labels[i]} {self._addresses[i]:<{self._width}}  {status}"

    def begin(self, i: int, status: str) -> None:
        """Shard ``i`` started ``status`` (e.g. ``saving``)."""
        self._status[i] = status + "..."
        self._started[i] = time.monotonic()
        self._done[i] = False

    def finish(self, i: int, status: str) -> None:
        """Shard ``i`` ended with ``status``."""
        self._status[i] = status
        self._done[i] = True
        if not self._tty and not self._quiet:
            self._stream.write(self._line(i) + "\n")
            self._stream.flush()

    def draw(self) -> None:
        """Redraw every line (terminal only)."""
        if not self._tty or self._quiet:
            return
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")  # back to the first line drawn
        out += ["\x1b[2K" + self._line(i) + "\n" for i in range(len(self._addresses))]
        self._drawn = len(self._addresses)
        self._stream.write("".join(out))
        self._stream.flush()

    def end_phase(self) -> None:
        """Keep the lines drawn so far; the next phase draws below them."""
        self.draw()
        self._drawn = 0


@dataclass
class Cluster:
    """Blocking admin stubs for every listed shard, in the order of ``addresses``.

    Positions in ``addresses`` are not shard indexes: :meth:`check_identity` learns
    the index of each (``indexes``), and every message names a shard by its index.

    :ivar credentials: TLS credentials (None = plaintext).
    :ivar token: admin bearer token sent on every call ("" = none).
    :ivar indexes: the shard index each address reported (its position until
        :meth:`check_identity` ran).
    :ivar num_shards: the shard count they reported (0 until then).
    """

    addresses: list[str]
    timeout: float
    out: TextIO
    err: TextIO
    tty: bool
    credentials: grpc.ChannelCredentials | None = None
    token: str = ""

    def __post_init__(self) -> None:
        self._channels = [
            grpc.insecure_channel(a, options=_CHANNEL_OPTIONS) if self.credentials is None
            else grpc.secure_channel(a, self.credentials, options=_CHANNEL_OPTIONS)
            for a in self.addresses
        ]
        self.stubs = [
            ps_grpc.ParameterServerAdminStub(with_token(c, self.token)) for c in self._channels
        ]
        self._data_stubs = [
            ps_grpc.ParameterServerStub(with_token(c, self.token)) for c in self._channels
        ]
        self.indexes = list(range(len(self.addresses)))
        self.num_shards = 0

    def identity(self, k: int) -> ShardIdentity:
        """What address ``k`` says it is: admin ``Stats`` (answers while a shard drains
        or restores), or the data plane's ``GetShardInfo`` when the token is a data-plane
        token (``PERMISSION_DENIED`` on Stats)."""
        try:
            r: Any = self.stubs[k].Stats(pb.StatsRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            if not (isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.PERMISSION_DENIED):
                raise
            r = self._data_stubs[k].GetShardInfo(pb.ShardInfoRequest(), timeout=self.timeout)
        return ShardIdentity(r.shard_index, r.num_shards, r.cluster_id)

    def check_identity(self, shards: Sequence[int] | None) -> None:
        """Ask every address who it is and check the addresses are the cluster's shards
        in index order (``shards`` None) or the shards ``shards`` of one cluster; then
        :attr:`indexes` and :attr:`num_shards` are what they said.

        :raises AdminCommandError: an address did not answer, or the list is not that;
            the message says what each address said.
        """
        n = len(self.addresses)
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(self.identity, k) for k in range(n)]
            concurrent.futures.wait(futures)
        failures, lines = [], []
        for k, fut in enumerate(futures):
            err = fut.exception()
            if err is None:
                lines.append(f"  address {k} {self.addresses[k]}: {fut.result()}")
                continue
            what = _rpc_error(err) if isinstance(err, grpc.RpcError) else str(err)
            # Named as the shard it should be (the same line as a failed command's).
            expected = k if shards is None else shards[k]
            failures.append(f"shard {expected} ({self.addresses[k]}) failed: {what}")
            lines.append(f"  address {k} {self.addresses[k]}: no answer")
        if failures:
            raise AdminCommandError(
                "\n".join(failures) + "\ncannot tell which shard every address is; nothing "
                "was done. Each address said:\n" + "\n".join(lines)
            )
        said = [f.result() for f in futures]
        problem = identity_mismatch(self.addresses, said, shards)
        if problem:
            raise AdminCommandError(
                f"{problem}\nnothing was done: list every shard in index order, or give "
                "--shards=I,J,... with the index of each listed address"
            )
        self.indexes = [s.shard_index for s in said]
        self.num_shards = said[0].num_shards

    @property
    def partial(self) -> bool:
        """Whether the listed shards are not the whole cluster."""
        return sorted(self.indexes) != list(range(self.num_shards))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def each(
        self,
        verb: str,
        call: Callable[[int, ps_grpc.ParameterServerAdminStub], _T],
        describe: Callable[[_T], str],
        shards: Sequence[int] | None = None,
        *,
        quiet: bool = False,
    ) -> list[_T]:
        """Run ``call(k, stub)`` on every listed address (or the positions ``shards``)
        concurrently, showing progress (none with ``quiet``).

        :returns: the results in the order of the addresses.
        :raises AdminCommandError: any shard failed (all are waited for first); the
            message names every failed shard (its index) with its status.
        """
        indexes = list(range(len(self.stubs))) if shards is None else list(shards)
        progress = Progress(self.out, [self.addresses[i] for i in indexes], tty=self.tty,
                            quiet=quiet, labels=[self.indexes[i] for i in indexes])
        results: dict[int, _T] = {}
        failures: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(indexes)) as pool:
            futures = {}
            for row, i in enumerate(indexes):
                progress.begin(row, verb)
                futures[pool.submit(call, i, self.stubs[i])] = row
            pending = set(futures)
            while pending:
                progress.draw()
                done, pending = concurrent.futures.wait(
                    pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for fut in done:
                    row = futures[fut]
                    i = indexes[row]
                    try:
                        result = fut.result()
                    except grpc.RpcError as e:
                        progress.finish(row, f"FAILED {_rpc_error(e)}")
                        failures.append(
                            f"shard {self.indexes[i]} ({self.addresses[i]}) failed: "
                            f"{_rpc_error(e)}"
                        )
                    else:
                        results[i] = result
                        progress.finish(row, describe(result))
        progress.end_phase()
        if failures:
            raise AdminCommandError("\n".join(failures))
        return [results[i] for i in indexes]


# ---------------------------------------------------------------- commands


def _saved(r: pb.AdminCheckpointResponse) -> str:
    return (f"{r.entries} entries, {len(r.files)} files, {_size(r.bytes)} in "
            f"{r.duration_seconds:.1f}s")


def cmd_save(cluster: Cluster, args: argparse.Namespace) -> None:
    request = pb.AdminSaveRequest(
        model_dir=args.model_dir, global_step=args.global_step, max_to_keep=args.max_to_keep
    )
    if cluster.partial:
        raise AdminCommandError(
            f"save: the addresses are shards {cluster.indexes} of {cluster.num_shards}; a "
            "save must reach every shard of the cluster; nothing was saved"
        )
    t0 = time.monotonic()
    print(f"saving {args.model_dir} step {args.global_step} on {len(cluster.addresses)} "
          "shards", file=cluster.out)
    try:
        parts = cluster.each(
            "saving", lambda i, s: s.SaveCheckpoint(request, timeout=cluster.timeout), _saved
        )
    except AdminCommandError as e:
        raise AdminCommandError(f"{e}\nsave: not committed; the previous checkpoint "
                                "stays the latest") from e
    try:
        cluster.each(
            "committing", lambda i, s: s.CommitCheckpoint(request, timeout=cluster.timeout),
            lambda r: f"committed {r.prefix}", shards=[cluster.indexes.index(0)],
        )
    except AdminCommandError as e:
        raise AdminCommandError(f"{e}\nsave: every shard wrote its part but the commit "
                                "failed; the previous checkpoint stays the latest") from e
    entries = sum(p.entries for p in parts)
    nbytes = sum(p.bytes for p in parts)
    print(f"saved {parts[0].prefix}: {entries} entries, {_size(nbytes)} on "
          f"{len(parts)} shards in {time.monotonic() - t0:.1f}s", file=cluster.out)


def cmd_export(cluster: Cluster, args: argparse.Namespace) -> None:
    request = pb.AdminExportRequest(
        model_dir=args.model_dir, global_step=args.global_step, layout=args.layout,
        num_ps=args.num_ps,
    )
    if cluster.partial:
        raise AdminCommandError(
            f"export: the addresses are shards {cluster.indexes} of {cluster.num_shards}; an "
            "export must reach every shard of the cluster; nothing was exported"
        )
    t0 = time.monotonic()
    print(f"exporting {args.model_dir} step {args.global_step} as {args.layout} for "
          f"{args.num_ps} parameter server(s) on {len(cluster.addresses)} shards",
          file=cluster.out)
    try:
        parts = cluster.each(
            "exporting", lambda i, s: s.ExportCheckpoint(request, timeout=cluster.timeout),
            _saved,
        )
    except AdminCommandError as e:
        raise AdminCommandError(f"{e}\nexport: not committed; TensorFlow does not see "
                                "the step") from e
    commit = pb.AdminExportRequest()
    commit.CopyFrom(request)
    commit.commit = True
    try:
        cluster.each(
            "committing", lambda i, s: s.ExportCheckpoint(commit, timeout=cluster.timeout),
            lambda r: f"committed {r.prefix}", shards=[cluster.indexes.index(0)],
        )
    except AdminCommandError as e:
        raise AdminCommandError(f"{e}\nexport: every shard wrote its files but the commit "
                                "failed; TensorFlow does not see the step") from e
    entries = sum(p.entries for p in parts)
    nbytes = sum(p.bytes for p in parts)
    print(f"exported {parts[0].prefix}: {entries} entries, {_size(nbytes)} on "
          f"{len(parts)} shards in {time.monotonic() - t0:.1f}s", file=cluster.out)


def cmd_restore(cluster: Cluster, args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    validate = pb.AdminRestoreRequest(
        model_dir=args.model_dir, prefix=args.prefix, validate_only=True,
        reset_filters=args.reset_filters,
    )
    print(f"validating {args.prefix or 'the latest checkpoint'} of {args.model_dir} on "
          f"{len(cluster.addresses)} shards", file=cluster.out)
    try:
        checked = cluster.each(
            "validating", lambda i, s: s.RestoreCheckpoint(validate, timeout=cluster.timeout),
            lambda r: f"ok {r.entries} entries would be held ({_size(r.bytes)} read)"
                      + _resets(r, "would reset"),
        )
    except AdminCommandError as e:
        raise AdminCommandError(f"{e}\nrestore: validation failed; nothing was "
                                "restored on any shard") from e
    prefixes = sorted({r.prefix for r in checked})
    if len(prefixes) != 1:
        raise AdminCommandError(
            f"restore: shards resolved different checkpoints ({', '.join(prefixes)}); "
            "pass --prefix; nothing was restored"
        )
    if args.validate_only:
        print(f"valid: {prefixes[0]} ({sum(r.entries for r in checked)} entries)",
              file=cluster.out)
        return
    restore = pb.AdminRestoreRequest(model_dir=args.model_dir, prefix=prefixes[0],
                                     reset_filters=args.reset_filters)
    print(f"restoring {prefixes[0]}", file=cluster.out)
    try:
        done = cluster.each(
            "restoring", lambda i, s: s.RestoreCheckpoint(restore, timeout=cluster.timeout),
            lambda r: f"restored {r.entries} entries, {len(r.tables)} tables in "
                      f"{r.duration_seconds:.1f}s" + _resets(r, "reset"),
        )
    except AdminCommandError as e:
        raise AdminCommandError(
            f"{e}\nrestore: the failed shards are unchanged, the others hold "
            f"{prefixes[0]}; fix the cause and restore again"
        ) from e
    print(f"restored {prefixes[0]}: {sum(r.entries for r in done)} entries on "
          f"{len(done)} shards in {time.monotonic() - t0:.1f}s", file=cluster.out)
    for i, r in enumerate(done):
        if r.reset_filters:
            names = ", ".join(map(repr, r.reset_filters))
            print(f"shard {i} ({cluster.addresses[i]}): hash filter(s) {names} reset to "
                  "empty (saved by another shard count)", file=cluster.out)


def _resets(r: pb.AdminCheckpointResponse, verb: str) -> str:
    return f"; {verb} hash filter(s) {', '.join(map(repr, r.reset_filters))}" if (
        r.reset_filters) else ""


def cmd_evict(cluster: Cluster, args: argparse.Namespace) -> None:
    request = pb.EvictRequest(table=args.table)

    def describe(r: pb.EvictResponse) -> str:
        per_table = ", ".join(f"{t.table}: -{t.evicted} ({t.remaining} left)"
                              for t in r.tables)
        return f"evicted {r.evicted}" + (f" [{per_table}]" if per_table else "")

    done = cluster.each(
        "evicting", lambda i, s: s.Evict(request, timeout=cluster.timeout), describe
    )
    print(f"evicted {sum(r.evicted for r in done)} expired entries", file=cluster.out)


def cmd_stats(cluster: Cluster, args: argparse.Namespace) -> None:
    request = pb.StatsRequest()

    def call(i: int, stub: ps_grpc.ParameterServerAdminStub) -> pb.StatsResponse:
        return stub.Stats(request, timeout=cluster.timeout)

    if args.json:
        results = cluster.each("asking", call, lambda r: r.state, quiet=True)
        shards = [{"address": a, **plain(r)} for a, r in
                  zip(cluster.addresses, results, strict=True)]
        json.dump({"shards": shards}, cluster.out, indent=1, sort_keys=True)
        cluster.out.write("\n")
        return
    results = cluster.each("asking", call, lambda r: r.state)
    for address, r in zip(cluster.addresses, results, strict=True):
        print(f"\nshard {r.shard_index}/{r.num_shards} {address}  {r.state}  up "
              f"{r.uptime_seconds:.0f}s  version {r.version}  in flight {r.in_flight}  "
              f"cluster {r.cluster_id or '(none yet)'}", file=cluster.out)
        print(f"  entries {r.entries}  memory {_size(r.memory_bytes)}", file=cluster.out)
        for t in r.tables:
            print(f"  table {t.name}: {t.entries} entries, {_size(t.memory_bytes)}, dim "
                  f"{t.dim_size}, evicted {t.evicted_entries}", file=cluster.out)
        for f in r.hash_filters:
            print(f"  filter {f.name} ({f.filter_type}): fill {f.fill_ratio:.4f}, "
                  f"failures {f.failure_count}", file=cluster.out)
        for label, rec in (("last save", r.last_save), ("last restore", r.last_restore)):
            if rec.op:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.start_time))
                what = f"FAILED {rec.error}" if rec.error else (
                    f"{rec.entries} entries, {_size(rec.bytes)}")
                print(f"  {label}: {rec.prefix} at {when}, {rec.duration_seconds:.1f}s, "
                      f"{what}", file=cluster.out)


def cmd_drain(cluster: Cluster, args: argparse.Namespace) -> None:
    request = pb.DrainRequest(grace_seconds=args.grace_seconds)

    def describe(r: pb.DrainResponse) -> str:
        if r.in_flight:
            return f"drained; {r.in_flight} calls still running after {r.waited_seconds:.1f}s"
        return f"drained (waited {r.waited_seconds:.1f}s)"

    cluster.each("draining", lambda i, s: s.Drain(request, timeout=cluster.timeout), describe)
    print("drained: the shards refuse data-plane calls until restarted", file=cluster.out)


# ---------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ps-admin",
        description="Operate a monolith-ps cluster: save, restore, evict, stats, drain.",
    )
    parser.add_argument(
        "--addresses", required=True,
        help="comma-separated host:port of every shard, in shard order",
    )
    parser.add_argument(
        "--shards", default="",
        help="comma-separated shard index of each address, to operate on part of a "
             "cluster (e.g. restore one crashed shard); default: the addresses are every "
             "shard, in index order",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0,
        help="seconds allowed for each shard's call (default 3600: restores of big "
             "tables take a while)",
    )
    parser.add_argument(
        "--tls_ca_file", default="",
        help="PEM CA bundle that signed the shards' certificates: connect with TLS "
             "(default: plaintext)",
    )
    parser.add_argument(
        "--tls_cert_file", default="",
        help="PEM client certificate for shards that require mutual TLS (with --tls_key_file)",
    )
    parser.add_argument("--tls_key_file", default="", help="PEM key of --tls_cert_file")
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV, ""),
        help=f"the shards' admin token (default: ${TOKEN_ENV}; prefer --token_file)",
    )
    parser.add_argument("--token_file", default="", help="file holding the admin token")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("save", help="save a checkpoint of every shard and commit it")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--global_step", type=int, required=True)
    p.add_argument("--max_to_keep", type=int, default=0,
                   help="keep this many checkpoints, deleting older ones (0 = all)")
    p = sub.add_parser("restore", help="validate on every shard, then restore everywhere")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--prefix", default="",
                   help="model.ckpt-<step> or its full path (default: the latest)")
    p.add_argument("--reset_filters", action="store_true",
                   help="restore a checkpoint saved by another shard count with its "
                        "hash filters emptied (refused otherwise)")
    p.add_argument("--validate_only", action="store_true",
                   help="only check every file on every shard")
    p = sub.add_parser("export", help="write a checkpoint in Monolith's layout and commit it")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--global_step", type=int, required=True)
    p.add_argument("--layout", choices=("monolith", "monolith-multi"), default="monolith",
                   help="monolith: a HashTable per table; monolith-multi: native "
                        "MultiHashTable (CpuTraining's default)")
    p.add_argument("--num_ps", type=int, default=1,
                   help="the Monolith job's parameter servers (0 = a single-process job)")
    p = sub.add_parser("evict", help="delete expired entries now")
    p.add_argument("--table", default="", help="one table (default: every table)")
    p = sub.add_parser("stats", help="sizes, filters, last save/restore of every shard")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("drain", help="stop accepting data-plane calls (until restart)")
    p.add_argument("--grace_seconds", type=float, default=0.0,
                   help="wait this long for running calls (0 = each shard's --grace_seconds)")
    return parser


_COMMANDS: dict[str, Callable[[Cluster, argparse.Namespace], None]] = {
    "save": cmd_save,
    "restore": cmd_restore,
    "export": cmd_export,
    "evict": cmd_evict,
    "stats": cmd_stats,
    "drain": cmd_drain,
}


def run(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """Run ``ps-admin`` with ``argv`` (without the program name); return the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = _parser()
    args = parser.parse_args(argv)
    addresses = [a.strip() for a in args.addresses.split(",") if a.strip()]
    if not addresses:
        parser.error("--addresses names no shard")
    shards: list[int] | None = None
    if args.shards:
        try:
            shards = [int(x) for x in args.shards.split(",")]
        except ValueError:
            parser.error(f"--shards must be comma-separated shard indexes, got {args.shards!r}")
        if len(shards) != len(addresses) or len(set(shards)) != len(shards) or min(shards) < 0:
            parser.error(f"--shards must give one distinct index >= 0 per address "
                         f"({len(addresses)} addresses), got {args.shards!r}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    if (args.tls_cert_file or args.tls_key_file) and not args.tls_ca_file:
        parser.error("--tls_cert_file/--tls_key_file need --tls_ca_file")
    try:
        credentials = channel_credentials(
            args.tls_ca_file, args.tls_cert_file, args.tls_key_file
        ) if args.tls_ca_file else None
        token = _token(args)
    except ConfigError as e:
        parser.error(str(e))
    tty = bool(getattr(out, "isatty", lambda: False)())
    cluster = Cluster(addresses, args.timeout, out, err, tty, credentials, token)
    try:
        cluster.check_identity(shards)
        _COMMANDS[args.command](cluster, args)
    except AdminCommandError as e:
        out.flush()
        print(f"ps-admin {args.command}: {e}", file=err)
        return 1
    finally:
        cluster.close()
    return 0


def _token(args: argparse.Namespace) -> str:
    if not args.token_file:
        return str(args.token).strip()
    try:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--token_file: cannot read {args.token_file!r}: {e}") from e
    if not token:
        raise ConfigError(f"--token_file: {args.token_file!r} is empty")
    return token


def main() -> None:
    """Entry point of the ``ps-admin`` console script."""
    sys.exit(run())


if __name__ == "__main__":
    main()
