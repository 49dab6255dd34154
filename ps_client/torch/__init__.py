"""PyTorch modules over sharded tables (the ``[torch]`` extra; the core never imports torch).

* :class:`ShardedEmbedding` / :class:`ShardedEmbeddingBag`: ``torch.nn.Embedding`` /
  ``torch.nn.EmbeddingBag`` whose rows live on the shards (one :class:`ps_client.Table`);
* :class:`ShardedEmbeddingBagCollection`: many features over many tables, one fused
  round trip per shard (``{name: (values, offsets)}`` in, ``{name: tensor}`` out; or
  TorchRec's ``KeyedJaggedTensor`` in and a ``KeyedTensor`` out, as TorchRec's
  ``EmbeddingBagCollection``, which it can replace: ``from_torchrec_configs``). TorchRec
  stays optional: it is imported only to build the output for an input of its type.

The step API: ``out = module(ids)``; ``loss.backward()``; ``module.apply_gradients(step)``
sends the gradient of every forward since the last call to the shards, where the
table's own optimizer, learning-rate functions (at ``step``) and hash filter apply —
``Table.apply_gradients`` semantics, every occurrence one step unless ``enable_dedup``.
The dense part is trained by any ``torch.optim`` optimizer as usual.

Misuse: a second backward through one forward before ``apply_gradients`` raises
``RuntimeError`` (its gradient was already taken); ``apply_gradients`` with no gradient
pending raises ``RuntimeError``; forwards whose output got no gradient are dropped at
the next ``apply_gradients``. Forwards in ``eval()`` mode or under ``torch.no_grad()``
record nothing.

Pipelining (``pipelined=True``; feed batches through :func:`prefetching`, or call
``module.prefetch(next_input)`` yourself): the next batch's lookup runs while the
current batch computes, and ``apply_gradients`` returns at once, its push running in the
background in call order (its error is raised by the next forward, ``apply_gradients``
or ``flush()``). What a forward sees:

* ``staleness=0`` (default): every update of this module's earlier
  ``apply_gradients`` calls, as without pipelining — the rows of ids that the pushes
  since the prefetch touched are read again after those pushes land, so results equal
  the synchronous module's exactly;
* ``staleness=k``: all of them except possibly the ``k`` most recent ``apply_gradients``
  calls (their pushes may still be in flight), never more; faster, as the forward
  waits for no push.

Updates by other trainers are not tracked: with several trainers a lookup sees what
the shards hold when it runs, as with the plain client. ``module.flush()`` waits for
every push (call it before evaluating or checkpointing); ``module.step_times`` sums the
time spent waiting for lookups and pushes.
"""

from ps_client.torch._pipeline import StepTimes
from ps_client.torch.modules import (
    Feature,
    ShardedEmbedding,
    ShardedEmbeddingBag,
    ShardedEmbeddingBagCollection,
    prefetching,
)

__all__ = [
    "Feature",
    "ShardedEmbedding",
    "ShardedEmbeddingBag",
    "ShardedEmbeddingBagCollection",
    "StepTimes",
    "prefetching",
]
