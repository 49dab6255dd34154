"""Demo trainer: a factorization machine on synthetic click logs, against real shards.

An example trainer built on the library, not part of it. ``bash scripts/demo.sh`` (or
``python examples/demo_trainer.py``) starts a local cluster (unless ``--addresses`` is
given), trains a small CTR model whose sparse part lives on the parameter server, saves a
checkpoint half-way, kills one shard with SIGKILL, restarts it empty, restores that
shard from the checkpoint with ``ps-admin restore`` (the other shards keep their newer
state, as after a real crash) and finishes training, printing loss and AUC as it goes.

The data has a known ground truth: each feature id has a true weight, clicks are
drawn from ``sigmoid(bias + sum of the true weights of the example's features)``,
and feature ids follow a Zipf law inside each slot (fid v2 layout: slot in bits
48..62). The best achievable AUC is printed next to the model's.

The model: per feature an embedding ``[w, v_1..v_k]`` (linear weight plus factor
vector), trained with Adagrad on the shards; the global bias is dense and kept here.
``logit = b + sum_f w_f + 0.5 * sum_k ((sum_f v_fk)^2 - sum_f v_fk^2)``.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protos import embedding_hash_table_pb2 as eht
from ps_client import PsClient
from ps_client.testing import LocalCluster, local_cluster

SLOT_SHIFT = 48


@dataclass(frozen=True)
class Synthetic:
    """A click-log generator with a known ground truth."""

    num_slots: int = 8
    vocab: int = 50_000
    zipf_a: float = 1.15
    bias: float = -1.2
    weight_scale: float = 0.8
    seed: int = 7

    def true_weights(self) -> npt.NDArray[np.float32]:
        rng = np.random.default_rng(self.seed)
        return rng.normal(0.0, self.weight_scale, size=(self.num_slots, self.vocab)).astype(
            np.float32
        )

    def batch(
        self, rng: np.random.Generator, n: int, weights: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """``(fids[n, slots], labels[n], true_logits[n])``."""
        idx = np.minimum(rng.zipf(self.zipf_a, size=(n, self.num_slots)) - 1, self.vocab - 1)
        slots = np.arange(1, self.num_slots + 1, dtype=np.int64)
        fids = (slots[None, :] << SLOT_SHIFT) | idx.astype(np.int64)
        logits = self.bias + weights[np.arange(self.num_slots)[None, :], idx].sum(axis=1)
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return fids, labels, logits.astype(np.float32)


def auc(labels: npt.NDArray[np.float32], scores: npt.NDArray[np.float32]) -> float:
    """Area under the ROC curve (rank statistic, ties averaged)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, ends - starts)
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class FactorizationMachine:
    """The dense half of the model and its gradient math; embeddings come from the PS."""

    def __init__(self, num_slots: int, k: int) -> None:
        self.num_slots = num_slots
        self.k = k
        self.bias = 0.0

    def forward(self, emb: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``emb[n, slots, 1 + k]`` -> logits ``[n]``."""
        w = emb[:, :, 0].sum(axis=1)
        v = emb[:, :, 1:]
        s = v.sum(axis=1)
        pair = 0.5 * ((s * s).sum(axis=1) - (v * v).sum(axis=(1, 2)))
        return (self.bias + w + pair).astype(np.float32)

    def backward(
        self, emb: npt.NDArray[np.float32], labels: npt.NDArray[np.float32], lr_bias: float
    ) -> tuple[float, npt.NDArray[np.float32]]:
        """Mean log loss and the gradient w.r.t. every embedding row ``[n, slots, 1+k]``."""
        logits = self.forward(emb)
        p = 1.0 / (1.0 + np.exp(-logits))
        eps = 1e-7
        loss = float(-np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps)))
        d = ((p - labels) / labels.size).astype(np.float32)  # dL/dlogit per example
        grads = np.empty_like(emb)
        grads[:, :, 0] = d[:, None]
        s = emb[:, :, 1:].sum(axis=1, keepdims=True)
        grads[:, :, 1:] = d[:, None, None] * (s - emb[:, :, 1:])
        self.bias -= lr_bias * float(d.sum())
        return loss, grads


def table_config(k: int) -> eht.EmbeddingHashTableConfig:
    """One segment of dim 1 + k, Adagrad, small random init for the factors."""
    seg = eht.EntryConfig.Segment(dim_size=1 + k)
    seg.opt_config.adagrad.initial_accumulator_value = 0.1
    seg.init_config.random_uniform.minval = -0.01
    seg.init_config.random_uniform.maxval = 0.01
    seg.comp_config.fp32.SetInParent()
    config = eht.EmbeddingHashTableConfig(cuckoo=eht.CuckooEmbeddingHashTableConfig())
    config.entry_config.segments.append(seg)
    return config


def progress(step: int, total: int, loss: float, score: float, note: str = "") -> None:
    width = 30
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    print(f"[{bar}] step {step:4d}/{total}  loss {loss:.4f}  auc {score:.4f}  {note}",
          flush=True)


@contextlib.contextmanager
def cluster_for(args: argparse.Namespace) -> Iterator[LocalCluster | None]:
    """A local cluster, or None when ``--addresses`` names running shards."""
    if args.addresses:
        yield None
        return
    with local_cluster(num_shards=args.shards) as cluster:
        yield cluster


def restore_with_ps_admin(address: str, model_dir: str) -> None:
    """Restore one shard from the latest checkpoint the way an operator would."""
    cmd = [sys.executable, "-m", "ps_server.admin_cli", f"--addresses={address}", "restore",
           f"--model_dir={model_dir}"]
    print("$ ps-admin --addresses=" + address + " restore --model_dir=" + model_dir, flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2, help="local shards to start")
    parser.add_argument("--addresses", default="", help="comma-separated running shards")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--k", type=int, default=4, help="factor dimension")
    parser.add_argument("--lr", type=float, default=1.0, help="Adagrad learning rate")
    parser.add_argument("--model_dir", default="", help="checkpoint directory (default: temp)")
    parser.add_argument("--no_fault", action="store_true", help="skip the kill/restore drill")
    args = parser.parse_args(argv)

    data = Synthetic()
    truth = data.true_weights()
    rng = np.random.default_rng(1)
    eval_fids, eval_labels, eval_logits = data.batch(np.random.default_rng(99), 20_000, truth)
    best = auc(eval_labels, eval_logits)
    print(f"synthetic click log: {data.num_slots} slots x {data.vocab:,} ids (Zipf a="
          f"{data.zipf_a}); best possible AUC on the eval set {best:.4f}")

    tmp = tempfile.TemporaryDirectory(prefix="monolith-ps-demo-")
    model_dir = args.model_dir or tmp.name
    started = time.perf_counter()
    with cluster_for(args) as cluster:
        addresses = cluster.addresses if cluster is not None else args.addresses.split(",")
        print(f"shards: {', '.join(addresses)}")
        with PsClient(addresses, timeout=60.0) as client:
            table = client.create_table(table_config(args.k), name="demo_fm",
                                        learning_rate_fns=(args.lr,))
            model = FactorizationMachine(data.num_slots, args.k)
            dim = 1 + args.k

            def evaluate() -> tuple[float, float]:
                emb = table.lookup(eval_fids.reshape(-1)).reshape(-1, data.num_slots, dim)
                logits = model.forward(emb)
                p = 1.0 / (1.0 + np.exp(-logits))
                loss = float(-np.mean(eval_labels * np.log(p + 1e-7)
                                      + (1 - eval_labels) * np.log(1 - p + 1e-7)))
                return loss, auc(eval_labels, logits)

            ckpt_step = args.steps // 2
            step = 0
            drilled = args.no_fault or cluster is None
            while step < args.steps:
                step += 1
                fids, labels, _ = data.batch(rng, args.batch, truth)
                flat = fids.reshape(-1)
                emb = table.lookup(flat).reshape(-1, data.num_slots, dim)
                _, grads = model.backward(emb, labels, lr_bias=args.lr)
                table.apply_gradients(flat, grads.reshape(-1, dim), global_step=step,
                                      enable_dedup=True)
                if step % 50 == 0 or step == args.steps:
                    progress(step, args.steps, *evaluate())
                if step == ckpt_step:
                    prefix = client.save_checkpoint(model_dir, step)
                    print(f"checkpoint saved: {prefix} ({table.size():,} entries)")
                if cluster is not None and not drilled and step == ckpt_step + 25:
                    drilled = True
                    victim = len(addresses) - 1
                    print(f"killing shard {victim} (SIGKILL) at step {step}...")
                    cluster.kill(victim)
                    cluster.restart(victim)
                    restore_with_ps_admin(cluster.addresses[victim], model_dir)
                    print(f"shard {victim} is back at checkpoint step {ckpt_step}; the "
                          f"other shards kept their newer state; training continues "
                          f"({table.size():,} entries)")
            loss, final = evaluate()
    elapsed = time.perf_counter() - started
    print(f"final: eval loss {loss:.4f}, AUC {final:.4f} (best possible {best:.4f}); "
          f"{elapsed:.1f} s")
    tmp.cleanup()
    return 0 if final > 0.6 else 1


if __name__ == "__main__":
    sys.exit(main())
