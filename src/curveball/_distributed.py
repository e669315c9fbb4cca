"""Data-parallel glue on ``torch.distributed``.

Every quantity of a CurveBall step that depends on the batch is either a
back-propagated vector (``Jᵀ u``, the data part of ``Δz``) or one of a handful
of scalars (the 2×2 system, the losses of the damping rule). With equal
per-process batches, averaging them over processes gives exactly the values of
one process holding the whole batch: one all-reduce of a parameter-sized
flattened vector (as for data-parallel SGD) plus one tiny all-reduce of scalars.
All processes then take identical decisions, so parameters, ``z`` and ``λ`` stay
identical everywhere. A non-finite value on any process turns the averaged
value non-finite on every process, so all of them skip that step together.

Use one ``CurveBall(model)`` per process on the plain module (not on a
``DistributedDataParallel`` wrapper, which is refused: the optimizer does its own
averaging) and give every process its own, equally sized shard of each global
batch; with unequal shards the average weights the samples unequally.
``optimizer.last.loss`` is the loss averaged over the processes (the loss of the
global batch), whereas the loss returned by ``step`` is the local one.

Batch normalisation uses per-process batch statistics, as with
``DistributedDataParallel`` without ``SyncBatchNorm``: each process normalises
its shard with that shard's mean and variance, so the curvature and gradient are
those of the per-shard normalised network, averaged. Parameters, ``z`` and ``λ``
still stay identical everywhere, but the running statistics (buffers) are not
synchronised: on every process they are updated exactly once per step, as by one
ordinary training-mode forward pass on that process's shard, and so differ
between processes. Broadcast or average them (e.g. from rank 0) before
evaluating or saving the model if one set is wanted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class Averager:
    """Averages tensors over the processes of a group (a no-op in a single process).

    Args:
        process_group: the group; ``None`` uses the default group when
            ``torch.distributed`` is initialised, else runs single-process.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group

    @property
    def world_size(self) -> int:
        if not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its average over the processes."""
        size = self.world_size
        if size == 1:
            return
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)
            tensor.div_(size)
