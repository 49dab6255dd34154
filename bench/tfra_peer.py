"""The TFRA peer of ``bench/trainer_bench.py``: TensorFlow Recommenders-Addons 0.8.1
dynamic-embedding tables on TensorFlow parameter-server tasks, called from a worker.

Run with the side venv's python (``bash scripts/tfra_venv.sh``); it imports only
TensorFlow, TFRA and numpy, never monolith-ps. It starts ``--ps`` TensorFlow servers
(``tf.distribute.Server``, job ``ps``) as their own processes on loopback ports, connects
this process to the cluster as the worker (``tf.config.experimental_connect_to_cluster``,
TensorFlow's own gRPC runtime), and builds one ``de.Variable`` of dim 32 whose shards are
placed on the ps tasks (TFRA's own placement: ``devices=[/job:ps/task:i]``, ids split by
TFRA's default partitioner). It fills 1,000,000 random ids, then times, on 65,536 distinct
ids of the table and one ``tf.function`` call each:

* ``lookup``: ``de.embedding_lookup``, values returned to this process as numpy;
* ``sgd_step``: lookup, then ``apply_gradients`` of given gradients (a loss whose gradient
  is them) with ``DynamicEmbeddingOptimizer(SGD(0.01))``;
* ``adagrad_step``: the same on a second table with Adagrad (initial accumulator 0.1),
  whose slot tables TFRA places next to the shards.

With ``--rounds`` it serves single calls instead (``bench/trainer_bench.py`` interleaves
them with its own, so both see the same load). Otherwise it prints one JSON object:
``{"ps": n, "lookup": p50_ms, "sgd_step": ..., "adagrad_step": ...}``
plus the per-call samples under ``"samples_ms"``.

Usage: ``.venv-tfra/bin/python bench/tfra_peer.py --ps 2 [--repeats 20] [--warmup 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROWS = 1_000_000
DIM = 32
BATCH = 65_536
FILL_BATCH = 1 << 17


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_spec(ps_ports: list[int], worker_port: int) -> dict[str, list[str]]:
    return {"ps": [f"127.0.0.1:{p}" for p in ps_ports],
            "worker": [f"127.0.0.1:{worker_port}"]}


def serve_ps(spec_json: str, index: int) -> None:
    import tensorflow as tf
    import tensorflow_recommenders_addons  # noqa: F401  (registers the table kernels)

    server = tf.distribute.Server(tf.train.ClusterSpec(json.loads(spec_json)), job_name="ps",
                                  task_index=index, protocol="grpc", start=True)
    server.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ps", type=int, default=1, help="parameter-server tasks")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per workload")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", action="store_true",
                        help="serve calls on stdin: after a ready line, each input line names "
                             "a workload; it runs once and its time (ms) is printed")
    parser.add_argument("--serve-ps", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ps >= 0:
        serve_ps(args.spec, args.serve_ps)
        return
    *ps_ports, worker_port = free_ports(args.ps + 1)
    spec = cluster_spec(ps_ports, worker_port)
    procs = [subprocess.Popen([sys.executable, __file__, "--serve-ps", str(i),
                               "--spec", json.dumps(spec)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(args.ps)]
    try:
        out = run(spec, args.ps, -1 if args.rounds else args.repeats, args.warmup)
        if out:
            print(json.dumps(out), flush=True)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def run(spec: dict[str, list[str]], n_ps: int, repeats: int, warmup: int) -> dict[str, object]:
    import tensorflow as tf
    import tensorflow_recommenders_addons as tfra
    from tensorflow.python.keras.optimizer_v2 import adagrad, gradient_descent

    de = tfra.dynamic_embedding
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(spec), task_type="worker", task_id=0, rpc_layer="grpc")
    tf.config.experimental_connect_to_cluster(resolver, job_name="worker", task_index=0,
                                              make_master_device_default=False)
    devices = [f"/job:ps/replica:0/task:{i}/device:CPU:0" for i in range(n_ps)]
    rng = np.random.default_rng(n_ps)
    ids = rng.choice(np.int64(1) << 40, size=ROWS, replace=False).astype(np.int64)

    def table(name: str) -> object:
        var = de.Variable(key_dtype=tf.int64, value_dtype=tf.float32, dim=DIM, devices=devices,
                          name=name, initializer=tf.keras.initializers.Zeros(),
                          init_size=ROWS // n_ps)
        for start in range(0, ROWS, FILL_BATCH):
            part = ids[start:start + FILL_BATCH]
            vals = rng.standard_normal((part.shape[0], DIM)).astype(np.float32)
            var.upsert(tf.constant(part), tf.constant(vals))
        return var

    sgd_var, ada_var = table("sgd_table"), table("adagrad_table")
    sgd_opt = de.DynamicEmbeddingOptimizer(gradient_descent.SGD(learning_rate=0.01))
    ada_opt = de.DynamicEmbeddingOptimizer(
        adagrad.Adagrad(learning_rate=0.01, initial_accumulator_value=0.1))

    @tf.function
    def lookup(batch: tf.Tensor) -> tf.Tensor:
        return de.embedding_lookup(sgd_var, batch)

    def make_step(var: object, opt: object) -> object:
        shadow_name = f"{var.name}_shadow"

        @tf.function
        def step(batch: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                emb = de.embedding_lookup(var, batch, name=shadow_name)
                loss = tf.reduce_sum(emb * grads)
            # The ShadowVariable TFRA made for this lookup (its TF2 training path).
            shadow = var.trainable_store[shadow_name]
            opt.apply_gradients([(tape.gradient(loss, shadow), shadow)])
            return emb
        return step

    sgd_step, ada_step = make_step(sgd_var, sgd_opt), make_step(ada_var, ada_opt)
    batch = tf.constant(rng.choice(ids, size=BATCH, replace=False))
    grads = tf.constant(rng.standard_normal((BATCH, DIM)).astype(np.float32) * 1e-3)
    calls = {
        "lookup": lambda: lookup(batch).numpy(),
        "sgd_step": lambda: sgd_step(batch, grads).numpy(),
        "adagrad_step": lambda: ada_step(batch, grads).numpy(),
    }
    # Once, before timing: both steps really update the tables on the ps tasks.
    g = grads.numpy()
    for step, var, want in ((sgd_step, sgd_var, lambda v: v - 0.01 * g),
                            (ada_step, ada_var, lambda v: v - 0.01 * g / np.sqrt(0.1 + g * g))):
        before = var.lookup(batch).numpy()
        step(batch, grads)
        after = var.lookup(batch).numpy()
        if not np.allclose(after, want(before), rtol=1e-4, atol=1e-6):
            raise SystemExit(f"tfra_peer: {var.name} was not updated as expected")
    out: dict[str, object] = {"ps": n_ps, "tensorflow": tf.__version__,
                              "tfra": tfra.__version__}
    if repeats < 0:  # --rounds: the caller interleaves these calls with its own
        print(json.dumps({"ready": True, **out}), flush=True)
        for line in sys.stdin:
            fn = calls[line.strip()]
            t0 = time.perf_counter()
            fn()
            print(f"{(time.perf_counter() - t0) * 1e3:.4f}", flush=True)
        return {}
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    for _ in range(repeats):  # interleaved round by round, as trainer_bench does
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    for name, s in samples.items():
        out[name] = float(np.percentile(s, 50))
    out["samples_ms"] = {k: [round(x, 3) for x in v] for k, v in samples.items()}
    return out


if __name__ == "__main__":
    main()
