"""Numbers that poison a row (issue 12, class 8), against real shard processes.

By default a shard refuses a write holding NaN or infinity in its values, gradients
or learning rates (INVALID_ARGUMENT naming the first bad row, nothing changed); a
shard started with ``--allow_non_finite`` accepts them. The client refuses, before
any RPC, complex numbers, finite values that overflow float32 and a ``global_step``
that is not an int64 >= 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_client import PsClient, PsInvalidArgument
from ps_client.testing import local_cluster

pytestmark = pytest.mark.integration

ADVICE = ("nothing was changed. A NaN or an infinity would make the row and its optimizer "
          "state NaN for good; the shard accepts them only when started with "
          "--allow_non_finite")


def adagrad_config(dim: int) -> eht.EmbeddingHashTableConfig:
    cfg = eht.EmbeddingHashTableConfig()
    cfg.cuckoo.SetInParent()
    seg = cfg.entry_config.segments.add()
    seg.dim_size = dim
    seg.init_config.zeros.SetInParent()
    seg.comp_config.fp32.SetInParent()
    seg.opt_config.adagrad.initial_accumulator_value = 0.1
    return cfg


@pytest.fixture(scope="module")
def client() -> Iterator[PsClient]:
    # One shard: a refused request changes nothing anywhere, and its row numbers are
    # the caller's.
    with local_cluster(1) as cluster, PsClient(cluster.addresses, timeout=30) as c:
        yield c


@pytest.fixture()
def seeded(client: PsClient) -> Iterator[tuple[PsClient, str]]:
    table = client.create_table(adagrad_config(2), learning_rate_fns=(0.5,))  # a new name
    table.assign([10, 11, 12], [[1, 2], [3, 4], [5, 6]])
    table.apply_gradients([10, 11, 12], [[1, 1], [1, 1], [1, 1]], 1)  # optimizer state
    yield client, table.name


def snapshot(client: PsClient, name: str) -> tuple[list[list[float]], list[bytes]]:
    table = client.table(name)
    ids = [10, 11, 12, 13]
    return table.lookup(ids).tolist(), table.lookup_entry(ids)


# ---------------------------------------------------------------- refused by the shard


@pytest.mark.parametrize(
    ("method", "bad", "message"),
    [
        ("assign", float("nan"), "values row 2 (id 12) holds nan at column 1"),
        ("assign_add", float("inf"), "values row 2 (id 12) holds inf at column 1"),
        ("apply_gradients", float("nan"), "grads row 2 (id 12) holds nan at column 1"),
        ("apply_gradients", -float("inf"), "grads row 2 (id 12) holds -inf at column 1"),
    ],
)
def test_non_finite_rows_are_refused_and_change_nothing(
    seeded: tuple[PsClient, str], method: str, bad: float, message: str
) -> None:
    client, name = seeded
    before = snapshot(client, name)
    table = client.table(name)
    rows = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, bad], [bad, bad]], dtype=np.float32)
    ids = [13, 10, 12, 11]
    call = {
        "assign": lambda: table.assign(ids, rows),
        "assign_add": lambda: table.assign_add(ids, rows),
        "apply_gradients": lambda: table.apply_gradients(ids, rows, 2),
    }[method]
    with pytest.raises(PsInvalidArgument) as info:
        call()
    err = info.value
    assert err.code == "INVALID_ARGUMENT"
    assert err.details == (
        f"table {name!r}: {message}, not a finite number (2 of 4 rows hold NaN or "
        f"infinity); {ADVICE}"
    )
    assert snapshot(client, name) == before  # values, optimizer state, no new id 13


def test_a_nan_learning_rate_is_refused(client: PsClient) -> None:
    table = client.create_table(adagrad_config(1), name="nan_lr",
                                learning_rate_fns=(lambda step: float("nan"),))
    table.assign([1], [[1.0]])
    before = table.lookup_entry([1])
    with pytest.raises(PsInvalidArgument) as info:
        table.apply_gradients([1], [[1.0]], 3)
    assert info.value.details == (
        f"table 'nan_lr': learning rate #0 is nan, not a finite number; {ADVICE}"
    )
    assert table.lookup_entry([1]) == before


def test_fused_apply_gradient_names_the_block_table_and_id(client: PsClient) -> None:
    a = client.create_table(adagrad_config(1), name="fused_a", learning_rate_fns=(0.1,))
    b = client.create_table(adagrad_config(2), name="fused_b", learning_rate_fns=(0.1,))
    # Blocks: table a gets ids [1, 2], table b gets ids [3, 4]; b's id 4 has a NaN.
    grads = [1.0, 1.0, 1.0, 1.0, 1.0, float("nan")]
    with pytest.raises(PsInvalidArgument) as info:
        client.fused_apply_gradient([a, b], [1, 2, 3, 4], None, [2, 2], grads,
                                    [0, 2, 4], [0, 2, 6], [0.1, 0.1], 0, 5, 1)
    assert info.value.details == (
        "fused_optimize: grads of block 1 (table 'fused_b') row 1 (id 4, row 3 of the "
        f"request) holds nan, not a finite number; {ADVICE}"
    )
    assert a.size() == 0 and b.size() == 0
    with pytest.raises(PsInvalidArgument, match="learning rate #1 is inf"):
        client.fused_apply_gradient([a, b], [1, 2, 3, 4], None, [2, 2], [1.0] * 6,
                                    [0, 2, 4], [0, 2, 6], [0.1, float("inf")], 0, 5, 1)
    assert a.size() == 0 and b.size() == 0


# ---------------------------------------------------------------- refused by the client


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[1.0, 2.0], [1e39, 0.0]]),
         "values row 1 holds 1e+39, beyond float32's range (±3.402823e+38): it would "
         "reach the shard as infinity (1 value(s) overflow); nothing was sent"),
        ([[1.0, 2.0], [0.0, -4e38]],  # a list of Python floats
         "values row 1 holds -4e+38, beyond float32's range (±3.402823e+38): it would "
         "reach the shard as infinity (1 value(s) overflow); nothing was sent"),
        (np.array([1.0, 2.0, 3.0, 1e300]),  # flat
         "values row 1 holds 1e+300, beyond float32's range (±3.402823e+38): it would "
         "reach the shard as infinity (1 value(s) overflow); nothing was sent"),
        (np.array([[1.0 + 0j, 2.0], [3.0, 4.0 + 1j]]),
         "values are complex (complex128); tables hold float32, so pass real numbers "
         "(numpy.real(...) if the imaginary part is meant to be dropped)"),
    ],
)
def test_overflow_and_complex_are_refused_before_any_rpc(
    seeded: tuple[PsClient, str], values: object, message: str
) -> None:
    client, name = seeded
    before = snapshot(client, name)
    table = client.table(name)
    with pytest.raises(PsInvalidArgument) as info:
        table.assign([10, 11], values)
    assert info.value.details == message and info.value.code == "INVALID_ARGUMENT"
    assert info.value.address is None  # the client's own check: no shard was called
    with pytest.raises(PsInvalidArgument) as info:
        table.apply_gradients([10, 11], values, 4)
    assert info.value.details == message.replace("values", "grads", 1)
    assert snapshot(client, name) == before


def test_finite_float64_within_float32_range_is_accepted(seeded: tuple[PsClient, str]) -> None:
    client, name = seeded
    table = client.table(name)
    table.assign([13], np.array([[3.4e38, -1e-50]]))  # the largest finite, an underflow
    assert table.lookup([13]).tolist() == [[np.float32(3.4e38), 0.0]]


def test_complex_grads_of_intercept_gradient_are_refused(client: PsClient) -> None:
    filters = client.create_hash_filters(True)
    with pytest.raises(PsInvalidArgument, match=r"^grads are complex \(complex128\)"):
        filters.intercept_gradient([1, 2], np.array([[1j], [2.0]]))


def test_a_learning_rate_beyond_float32_is_refused(client: PsClient) -> None:
    table = client.create_table(adagrad_config(1), name="huge_lr",
                                learning_rate_fns=(lambda step: 1e39 * step,))
    with pytest.raises(PsInvalidArgument) as info:
        table.apply_gradients([1], [[1.0]], 2)
    assert info.value.details == (
        "learning rate #0 is 2e+39 at global_step 2, beyond float32's range: it would "
        "reach the shards as infinity"
    )
    assert table.size() == 0


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (2**63, "global_step must be in [0, 2**63 - 1] (an int64 >= 0), got "
                "9223372036854775808"),
        (-5, "global_step must be in [0, 2**63 - 1] (an int64 >= 0), got -5"),
        (1.5, "global_step must be an integer (an int64 >= 0), got 1.5 (float)"),
        ("3", "global_step must be an integer (an int64 >= 0), got '3' (str)"),
        (True, "global_step must be an integer, got True"),
    ],
)
def test_global_step_is_checked_before_any_rpc(
    seeded: tuple[PsClient, str], tmp_path: Path, step: object, message: str
) -> None:
    client, name = seeded
    before = snapshot(client, name)
    table = client.table(name)
    calls = [
        lambda: table.apply_gradients([10], [[1.0, 1.0]], step),  # type: ignore[arg-type]
        lambda: client.fused_apply_gradient(
            [table], [10], None, [1], [1.0, 1.0], [0, 1], [0, 2], [0.1], 0,
            step, 1),  # type: ignore[arg-type]
        lambda: client.save_checkpoint(str(tmp_path / "m"), step),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(PsInvalidArgument) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert info.value.details == message and info.value.address is None
    assert snapshot(client, name) == before
    assert not (tmp_path / "m").exists()


def test_integral_steps_of_any_integer_type_are_accepted(seeded: tuple[PsClient, str]) -> None:
    client, name = seeded
    table = client.table(name)
    for step in (0, np.int64(7), np.uint32(8), 2**63 - 1):
        table.apply_gradients([13], [[0.0, 0.0]], step)  # type: ignore[arg-type]
    assert table.lookup([13]).tolist() == [[0.0, 0.0]]


# ---------------------------------------------------------------- --allow_non_finite


def test_a_shard_started_with_allow_non_finite_accepts_them() -> None:
    with local_cluster(1, allow_non_finite=True) as cluster, \
            PsClient(cluster.addresses, timeout=30) as client:
        table = client.create_table(adagrad_config(2), name="t", learning_rate_fns=(0.5,))
        table.assign([1, 2], [[float("nan"), 1.0], [float("inf"), 2.0]])
        got = table.lookup([1, 2])
        assert np.isnan(got[0, 0]) and got[0, 1] == 1.0
        assert got[1].tolist() == [float("inf"), 2.0]
        table.apply_gradients([3], [[float("nan"), 0.0]], 1)
        assert np.isnan(table.lookup([3])[0, 0])
        # The client's own checks do not depend on the shard's option.
        with pytest.raises(PsInvalidArgument, match="beyond float32's range"):
            table.assign([1], np.array([[1e39, 0.0]]))
