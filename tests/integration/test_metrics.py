"""The Prometheus endpoint of a shard, scraped over real HTTP after real RPCs."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.engine import configs
from tests.integration.conftest import CLIENT_OPTIONS, start_server_process
from tests.integration.test_admin import (
    DAY,
    T0,
    admin,
    expect_error,
    start_shard_server,
)
from tests.integration.test_service import assign, intercept, lookup, make_filter, make_table

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PS = "monolith_ps.ParameterServer"
ADMIN = "monolith_ps.ParameterServerAdmin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_rpc_table_filter_eviction_and_checkpoint_metrics(tmp_path: Path) -> None:
    port = free_port()
    with start_shard_server(metrics_port=port, eviction_check_seconds=0) as (srv, built):
        assert built.metrics_server is not None and built.metrics_server.port == port
        stub = srv.stub
        assert make_filter(stub, "f", threshold=3, capacity=1000, split_num=7)
        config = configs.table_config(2, expire_days=1)
        make_table(stub, "t", config)
        make_table(stub, "u", configs.table_config(1))
        for _ in range(3):
            assign(stub, "t", [1, 2], np.ones((2, 2)), req_time=T0)
        assign(stub, "t", [3], np.ones((1, 2)), req_time=T0 + DAY)  # clock: id 1, 2 expired
        for _ in range(3):
            lookup(stub, "t", [1, 2, 3])
        expect_error(lambda: lookup(stub, "nope", [1]), grpc.StatusCode.NOT_FOUND, "nope")
        intercept(stub, "f", [10, 11, 12, 10], np.ones((4, 1)))

        samples = scrape(port)
        rpcs = "monolith_ps_rpcs_total"
        assert value(samples, rpcs, service=PS, method="Lookup", code="OK") == 3
        assert value(samples, rpcs, service=PS, method="Lookup", code="NOT_FOUND") == 1
        assert value(samples, rpcs, service=PS, method="Assign", code="OK") == 4
        assert value(samples, rpcs, service=PS, method="CreateTable", code="OK") == 2
        duration = "monolith_ps_rpc_duration_seconds_count"
        assert value(samples, duration, service=PS, method="Lookup", code="OK") == 3
        assert value(samples, duration, service=PS, method="Lookup", code="NOT_FOUND") == 1
        assert value(samples, "monolith_ps_rpcs_in_flight", service=PS) == 0
        assert value(samples, "monolith_ps_table_entries", table="t") == 3
        assert value(samples, "monolith_ps_table_entries", table="u") == 0
        info = {t.name: t for t in stub.GetShardInfo(pb.ShardInfoRequest()).tables}
        assert value(samples, "monolith_ps_table_memory_bytes", table="t") == (
            info["t"].memory_bytes)
        # Capacity 1000; distinct ids counted: 10, 11, 12 → 3 occupied cells.
        assert value(samples, "monolith_ps_hash_filter_fill_ratio",
                     hash_filter="f") == pytest.approx(3 / 1000)
        assert value(samples, "monolith_ps_hash_filter_failures", hash_filter="f") == 0
        assert value(samples, "monolith_ps_shard_info", shard_index="0", num_shards="1",
                     version="0.1.0") == 1
        assert value(samples, "monolith_ps_restoring") == 0
        assert value(samples, "monolith_ps_draining") == 0
        assert ("process_resident_memory_bytes", frozenset()) in samples

        a = admin(srv)
        evicted = a.Evict(pb.EvictRequest(table="t"))
        assert evicted.evicted == 2  # ids 1 and 2: age 86400 >= 1 day
        model_dir = str(tmp_path / "m")
        saved = a.SaveCheckpoint(pb.AdminSaveRequest(model_dir=model_dir, global_step=1))
        a.CommitCheckpoint(pb.AdminSaveRequest(model_dir=model_dir, global_step=1))
        restored = a.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir=model_dir))
        a.SaveCheckpoint(pb.AdminSaveRequest(model_dir=model_dir, global_step=2))

        samples = scrape(port)
        assert value(samples, "monolith_ps_evicted_entries_total", table="t",
                     trigger="admin") == 2
        assert value(samples, "monolith_ps_table_entries", table="t") == 1
        assert value(samples, rpcs, service=ADMIN, method="Evict", code="OK") == 1
        # Admin and data-plane saves are both checkpoint operations.
        assert value(samples, "monolith_ps_checkpoint_duration_seconds_count", op="save") == 2
        assert value(samples, "monolith_ps_checkpoint_duration_seconds_count", op="commit") == 1
        assert value(samples, "monolith_ps_checkpoint_duration_seconds_count", op="restore") == 1
        saved_bytes = sum(os.path.getsize(f) for f in saved.files)
        second = str(tmp_path / "m" / "model.ckpt-2.assets")
        second_bytes = sum(os.path.getsize(os.path.join(second, f))
                           for f in os.listdir(second))
        assert value(samples, "monolith_ps_checkpoint_size_bytes_sum", op="save") == (
            saved_bytes + second_bytes)
        assert value(samples, "monolith_ps_checkpoint_size_bytes_sum", op="restore") == (
            restored.bytes)
        assert value(samples, "monolith_ps_checkpoint_entries_sum", op="restore") == 1
        assert value(samples, "monolith_ps_last_checkpoint_timestamp_seconds", op="save") > 0

        expect_error(lambda: a.RestoreCheckpoint(pb.AdminRestoreRequest(
            model_dir=model_dir, prefix="model.ckpt-99")), grpc.StatusCode.NOT_FOUND)
        a.Drain(pb.DrainRequest(grace_seconds=1))
        expect_error(lambda: lookup(stub, "t", [3]), grpc.StatusCode.UNAVAILABLE, "drained")
        samples = scrape(port)
        assert value(samples, "monolith_ps_checkpoint_failures_total", op="restore") == 1
        assert value(samples, "monolith_ps_draining") == 1
        # Refused calls are counted with their code.
        assert value(samples, rpcs, service=PS, method="Lookup", code="UNAVAILABLE") == 1
    with pytest.raises(urllib.error.URLError):
        scrape(port)  # stopped with the server


def test_no_metrics_endpoint_without_a_port() -> None:
    with start_shard_server() as (_, built):
        assert built.config.metrics_port == 0
        assert built.metrics_server is None


def test_ps_server_flag_serves_metrics(tmp_path: Path) -> None:
    port = free_port()
    with start_server_process(tmp_path, f"--metrics_port={port}") as sp:
        sp.wait_for_log(rf"metrics on http://127\.0\.0\.1:{port}/metrics")
        with grpc.insecure_channel(sp.address, options=CLIENT_OPTIONS) as channel:
            ps_grpc.ParameterServerStub(channel).ListTables(pb.ListTablesRequest())
        samples = scrape(port)
        assert value(samples, "monolith_ps_rpcs_total", service=PS, method="ListTables",
                     code="OK") == 1
