"""``python -m ps_server`` as a real process: port file, log line, graceful drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.engine import configs
from tests.integration.conftest import CLIENT_OPTIONS, REPO, start_server_process
from tests.integration.test_service import ids_tensor, lookup, make_table, rows_tensor

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


#: Child-process hook: engine work of ApplyGradients starts (logs "apply held"), then
#: waits until the server logged that it is shutting down (60 s safety net).
HOLD_APPLY_UNTIL_SHUTDOWN = """
import logging, threading
from ps_server.engine.hash_table import EmbeddingHashTable
shutting_down = threading.Event()
class _Seen(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("shutting down"):
            shutting_down.set()
logging.getLogger("ps_server.server").addHandler(_Seen())
_apply = EmbeddingHashTable.apply_gradients
def _held(self, *args, **kwargs):
    logging.getLogger("ps_server.test_hook").warning("apply held until shutdown")
    if not shutting_down.wait(60):
        logging.getLogger("ps_server.test_hook").error("no shutdown within 60 s")
    return _apply(self, *args, **kwargs)
EmbeddingHashTable.apply_gradients = _held
"""


def test_port_file_log_line_and_sigint(tmp_path: Path) -> None:
    flags = ("--shard_index=1", "--num_shards=2", "--shutdown_delay_seconds=3")
    with start_server_process(tmp_path, *flags) as sp:
        assert sp.port > 0
        assert sp.port_file.read_text() == f"{sp.port}\n"
        sp.wait_for_log(rf"serving shard 1/2 on 127\.0\.0\.1:{sp.port}$")
        with grpc.insecure_channel(sp.address, options=CLIENT_OPTIONS) as channel:
            stub = ps_grpc.ParameterServerStub(channel)
            info = stub.GetShardInfo(pb.ShardInfoRequest())
            assert (info.shard_index, info.num_shards) == (1, 2)
            make_table(stub, "t", configs.table_config(1))
            stub.Assign(pb.AssignRequest(table="t", ids=ids_tensor([3]),
                                         values=rows_tensor([[1.5]])))
            np.testing.assert_array_equal(lookup(stub, "t", [3]), [[1.5]])
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert health.Check(check).status == SERVING
            watch = health.Watch(check, timeout=60)
            assert next(watch).status == SERVING
            sp.send_signal(signal.SIGINT)
            # The shard pushes NOT_SERVING when the shutdown begins; during
            # shutdown_delay_seconds (counted from then) it still answers, NOT_SERVING.
            assert next(watch).status == NOT_SERVING
            watch.cancel()  # an open stream would hold the drain until grace
            assert health.Check(check, timeout=60).status == NOT_SERVING
        assert sp.wait() == 0
        assert not sp.port_file.exists()  # removed on a clean exit


def test_sigterm_drains_inflight_apply_gradients(tmp_path: Path) -> None:
    n, dim = 10_000, 16
    # The apply's engine work is held until the server began shutting down (a hook in
    # the child), so it outlasts the SIGTERM handling on any machine.
    with start_server_process(tmp_path, "--verbosity=1", "--grace_seconds=60",
                              prelude=HOLD_APPLY_UNTIL_SHUTDOWN) as sp:
        channel = grpc.insecure_channel(sp.address, options=CLIENT_OPTIONS)
        stub = ps_grpc.ParameterServerStub(channel)
        make_table(stub, "t", configs.table_config(dim, optimizer=configs.adagrad()))
        statuses: list[int] = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="monolith_ps.ParameterServer"))

        def follow() -> None:
            try:
                for resp in watch:
                    statuses.append(resp.status)
                    if resp.status == NOT_SERVING:
                        watch.cancel()  # an open stream would hold the drain until grace
            except grpc.RpcError:
                pass

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        request = pb.ApplyGradientsRequest(
            table="t",
            ids=ids_tensor(np.arange(n)),
            grads=rows_tensor(np.ones((n, dim), dtype=np.float32)),
            learning_rates=[0.1],
        )
        future = stub.ApplyGradients.future(request, timeout=120)
        sp.wait_for_log(r"ApplyGradients: start", timeout=60)
        sp.wait_for_log(r"apply held until shutdown", timeout=60)  # engine work runs
        assert not future.done()
        sp.send_signal(signal.SIGTERM)
        assert future.result() == pb.UpdateResponse()  # completes OK during the drain
        assert sp.wait() == 0
        watcher.join(30)
        assert not watcher.is_alive()
        channel.close()
        assert statuses[0] == SERVING and statuses[-1] == NOT_SERVING
        # The server began shutting down while the call was running.
        log = "\n".join(sp.lines)
        assert log.index("shutting down") < log.index("ApplyGradients: done"), log
        assert "no shutdown within" not in log


def test_bad_flags_exit_with_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ps_server", "--port=0", "--shard_index=2", "--num_shards=2"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "shard_index must be in [0, num_shards=2), got 2" in proc.stderr


def test_taken_port_fails_clearly(tmp_path: Path) -> None:
    with start_server_process(tmp_path) as sp:
        proc = subprocess.run(
            [sys.executable, "-m", "ps_server", f"--port={sp.port}", "--host=127.0.0.1"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 1
        assert f"cannot listen on 127.0.0.1:{sp.port}" in proc.stderr
