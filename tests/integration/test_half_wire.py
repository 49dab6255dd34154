"""The opt-in half-size wire against real shards on loopback: lookups answered as
float16 / bfloat16 and gradients sent as them, the shards' state and math float32.

Values representable in the half form come back exactly; gradients representable in it
give bit for bit the result of the same float32 gradients; others are rounded as
``protos.wire.narrow`` documents. A ``FloatWire`` value the shard does not know is
INVALID_ARGUMENT naming the field and the value.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from protos import ps_service_pb2 as pb
from protos.wire import BFLOAT16, FLOAT16, narrow, widen
from ps_client import PsClient, PsInvalidArgument
from ps_client.testing import local_cluster
from tests.integration.conftest import RunningServer
from tests.integration.test_service import ids_tensor, make_table, rows_tensor

HALF = {"float16": FLOAT16, "bfloat16": BFLOAT16}


def table_config(dim: int, optimizer: str) -> eht.EmbeddingHashTableConfig:
    cfg = eht.EmbeddingHashTableConfig()
    cfg.cuckoo.SetInParent()
    seg = cfg.entry_config.segments.add()
    seg.dim_size = dim
    seg.init_config.zeros.SetInParent()
    seg.comp_config.fp32.SetInParent()
    if optimizer == "adagrad":
        seg.opt_config.adagrad.initial_accumulator_value = 0.1
    else:
        seg.opt_config.sgd.SetInParent()
    return cfg


@pytest.fixture(scope="module", params=[1, 2], ids=["1shard", "2shards"])
def client(request: pytest.FixtureRequest) -> Iterator[PsClient]:
    with local_cluster(request.param) as cluster, PsClient(cluster.addresses, timeout=30) as c:
        yield c


def representable(n: int, dim: int, seed: int) -> np.ndarray:
    """Values exact in float16 and in bfloat16: 8 significant bits, moderate exponents."""
    rng = np.random.default_rng(seed)
    mant = rng.integers(-255, 256, size=(n, dim))
    return (mant * 2.0 ** rng.integers(-12, 4, size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_lookup_of_representable_values_is_exact(client: PsClient, wire_dtype: str) -> None:
    t = client.create_table(table_config(8, "sgd"))
    ids = np.arange(-50, 250, dtype=np.int64)
    values = representable(ids.size, 8, seed=1)
    t.assign(ids, values)
    asked = np.concatenate([ids[::-1], ids[:7], [10_000]])  # duplicates and a missing id
    got = t.lookup(asked, wire_dtype=wire_dtype)
    assert got.dtype == np.float32 and got.shape == (asked.size, 8)
    want = np.concatenate([values[::-1], values[:7], np.zeros((1, 8), np.float32)])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_lookup_rounds_as_documented(client: PsClient, wire_dtype: str) -> None:
    t = client.create_table(table_config(4, "sgd"))
    ids = np.arange(1000, dtype=np.int64)
    rng = np.random.default_rng(2)
    values = (rng.standard_normal((ids.size, 4)) * 10.0 ** rng.integers(-6, 6, (ids.size, 1))
              ).astype(np.float32)
    values[0] = [1e10, -1e10, 3.0e-8, 65519.0]  # float16: +inf, -inf, subnormal, rounds down
    t.assign(ids, values)
    wire = HALF[wire_dtype]
    got = t.lookup(ids, wire_dtype=wire_dtype)
    want = widen(narrow(values, wire), wire)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    if wire_dtype == "float16":
        assert got[0, 0] == np.inf and got[0, 1] == -np.inf and got[0, 3] == 65504.0
    # float32 (the default) stays exact.
    assert np.array_equal(t.lookup(ids).view(np.uint32), values.view(np.uint32))


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_representable_grads_give_the_float32_result(
    client: PsClient, wire_dtype: str, optimizer: str
) -> None:
    plain = client.create_table(table_config(6, optimizer), learning_rate_fns=[0.1])
    half = client.create_table(table_config(6, optimizer), learning_rate_fns=[0.1])
    ids = np.array([5, -3, 5, 8, 11, 2, 5, 100, 7], dtype=np.int64)
    for step in range(1, 4):
        grads = representable(ids.size, 6, seed=10 + step)
        plain.apply_gradients(ids, grads, step)
        half.apply_gradients(ids, grads, step, wire_dtype=wire_dtype)
        half.apply_gradients(ids, grads, step, enable_dedup=True, wire_dtype=wire_dtype)
        plain.apply_gradients(ids, grads, step, enable_dedup=True)
    a, b = plain.lookup(ids), half.lookup(ids)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert plain.lookup_entry(ids) == half.lookup_entry(ids)  # optimizer state too


def test_grads_are_rounded_before_the_float32_step(client: PsClient) -> None:
    t = client.create_table(table_config(3, "sgd"), learning_rate_fns=[1.0])
    ids = np.array([1, 2], dtype=np.int64)
    grads = np.array([[0.1, 1 + 2.0**-9, 3.0e-8], [-7.77, 2.0**-20, 1000.1]], np.float32)
    t.apply_gradients(ids, grads, 1, wire_dtype="bfloat16")
    want = -widen(narrow(grads, BFLOAT16), BFLOAT16)
    assert np.array_equal(t.lookup(ids), want)


def test_table_default_and_bad_names(client: PsClient) -> None:
    t = client.create_table(table_config(2, "sgd"), learning_rate_fns=[1.0])
    t.assign([1], [[0.1, 3.0]])
    assert t.wire_dtype == "float32"
    t.wire_dtype = "bfloat16"
    assert client.table(t.name).wire_dtype == "bfloat16"  # one default per table, per client
    assert np.array_equal(t.lookup([1]), widen(narrow(np.array([[0.1, 3.0]], np.float32),
                                                      BFLOAT16), BFLOAT16))
    assert t.lookup([1], wire_dtype="float32")[0, 0] == np.float32(0.1)  # the call wins
    t.wire_dtype = np.float16  # a numpy dtype names float16 / float32 too
    assert t.wire_dtype == "float16"
    with pytest.raises(PsInvalidArgument, match="wire_dtype must be one of"):
        t.wire_dtype = "int8"
    with pytest.raises(ValueError, match="'half'"):
        t.lookup([1], wire_dtype="half")
    with pytest.raises(ValueError, match="wire_dtype"):
        t.apply_gradients([1], [[1.0, 1.0]], 1, wire_dtype="float64")


def test_float16_overflow_is_refused_as_non_finite(client: PsClient) -> None:
    t = client.create_table(table_config(2, "sgd"), learning_rate_fns=[1.0])
    t.assign([3], [[1.0, 2.0]])
    with pytest.raises(PsInvalidArgument, match="travelled as float16") as info:
        t.apply_gradients([3], [[1.0, 70000.0]], 1, wire_dtype="float16")
    assert "65520" in str(info.value)
    assert np.array_equal(t.lookup([3]), [[1.0, 2.0]])  # nothing applied
    t.apply_gradients([3], [[1.0, 70000.0]], 1, wire_dtype="bfloat16")  # in bfloat16's range
    assert t.lookup([3])[0, 1] == 2.0 - 70144.0  # 70000 rounds to 70144 in bfloat16


def test_unknown_float_wire_is_invalid_argument(server: RunningServer) -> None:
    stub = server.stub
    make_table(stub, "t", table_config(2, "sgd"))
    with pytest.raises(grpc.RpcError) as info:
        stub.Lookup(pb.LookupRequest(table="t", ids=ids_tensor([1]), values_wire=7))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "LookupRequest.values_wire 7 is not a FloatWire" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        stub.ApplyGradients(pb.ApplyGradientsRequest(
            table="t", ids=ids_tensor([1]), grads=rows_tensor([[1.0, 1.0]]),
            learning_rates=[1.0], grads_wire=-2))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ApplyGradientsRequest.grads_wire -2 is not a FloatWire" in (
        info.value.details() or "")


def test_half_grads_of_the_wrong_size_name_the_form(server: RunningServer) -> None:
    stub = server.stub
    make_table(stub, "t", table_config(2, "sgd"))
    four_bytes_a_float = rows_tensor([[1.0, 1.0]])
    with pytest.raises(grpc.RpcError) as info:
        stub.ApplyGradients(pb.ApplyGradientsRequest(
            table="t", ids=ids_tensor([1]), grads=four_bytes_a_float, learning_rates=[1.0],
            grads_wire=pb.FLOAT_WIRE_BFLOAT16))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bfloat16" in (info.value.details() or "")


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_fused_ops_take_the_half_wire(client: PsClient, wire_dtype: str) -> None:
    # Tables of dims 3 and 2, N = 2 logical shards; ids of both parities.
    t0 = client.create_table(table_config(3, "adagrad"), learning_rate_fns=[0.5])
    t1 = client.create_table(table_config(2, "sgd"), learning_rate_fns=[0.25])
    r0, r1 = representable(4, 3, seed=20), representable(4, 2, seed=21)
    t0.assign([1, 2, -3, 8], r0)
    t1.assign([4, 5, 7, 10], r1)
    ids = np.array([1, -3, 4, 2, 8, 5, 7, 10], dtype=np.int64)
    sizes = [2, 1, 2, 3]  # (s0,t0) (s0,t1) (s1,t0) (s1,t1)
    emb, _, id_off, emb_off, indices = client.fused_lookup([t0, t1], ids, sizes, 2,
                                                           wire_dtype=wire_dtype)
    want, _, _, _, _ = client.fused_lookup([t0, t1], ids, sizes, 2)
    assert emb.dtype == np.float32
    assert np.array_equal(emb.view(np.uint32), want.view(np.uint32))

    # The same representable grads through float32 and the half wire, on twin tables.
    u0 = client.create_table(table_config(3, "adagrad"), learning_rate_fns=[0.5])
    u1 = client.create_table(table_config(2, "sgd"), learning_rate_fns=[0.25])
    u0.assign([1, 2, -3, 8], r0)
    u1.assign([4, 5, 7, 10], r1)
    grads = representable(1, emb.size, seed=22).reshape(-1)
    client.fused_apply_gradient([t0, t1], ids, indices, sizes, grads, id_off, emb_off,
                                [0.5, 0.25], 0, 1, 2, wire_dtype=wire_dtype)
    client.fused_apply_gradient([u0, u1], ids, indices, sizes, grads, id_off, emb_off,
                                [0.5, 0.25], 0, 1, 2)
    for a, b, some in ((t0, u0, [1, 2, -3, 8]), (t1, u1, [4, 5, 7, 10])):
        assert np.array_equal(a.lookup(some).view(np.uint32), b.lookup(some).view(np.uint32))
        assert a.lookup_entry(some) == b.lookup_entry(some)

    # None takes the tables' common default; differing defaults need an explicit one.
    t0.wire_dtype = t1.wire_dtype = wire_dtype
    assert np.array_equal(client.fused_lookup([t0, t1], ids, sizes, 2)[0],
                          client.fused_lookup([t0, t1], ids, sizes, 2,
                                              wire_dtype=wire_dtype)[0])
    t1.wire_dtype = "float32"
    with pytest.raises(PsInvalidArgument, match="wire_dtype defaults differ"):
        client.fused_lookup([t0, t1], ids, sizes, 2)
    with pytest.raises(PsInvalidArgument, match="wire_dtype"):
        client.fused_apply_gradient([t0, t1], ids, indices, sizes, grads, id_off, emb_off,
                                    [0.5, 0.25], 0, 1, 2, wire_dtype="int4")


def test_unknown_fused_float_wire_is_invalid_argument(server: RunningServer) -> None:
    stub = server.stub
    make_table(stub, "t", table_config(2, "sgd"))
    with pytest.raises(grpc.RpcError) as info:
        stub.FusedLookup(pb.FusedLookupRequest(
            tables=["t"], blocks=[pb.FusedBlock(table_index=0, num_ids=1)],
            ids=ids_tensor([1]), values_wire=3))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FusedLookupRequest.values_wire 3 is not a FloatWire" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        stub.FusedOptimize(pb.FusedOptimizeRequest(
            tables=["t"], blocks=[pb.FusedBlock(table_index=0, num_ids=1)],
            ids=ids_tensor([1]), grads=rows_tensor([1.0, 1.0]), learning_rates=[1.0],
            grads_wire=9))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FusedOptimizeRequest.grads_wire 9 is not a FloatWire" in (info.value.details() or "")
