"""What the training loop asks of the processes it trains with: which share of a batch is
this process's, whether to stop, and sums, values and gathers across processes.

`SINGLE_PROCESS` answers for a job that trains in one process: every "collective" is
the identity and costs nothing. `ProcessGroup` answers for one rank of a data-parallel
job (torch.distributed, NCCL on GPUs, gloo on CPU; worker/training/distributed.py
starts the processes). train.py and loop.py call the same methods in both cases, so a
1-process job and a P-process job run one code path (docs/architecture.md,
"Data-parallel jobs").

Every rank must call the collectives in the same order, the same number of times; the
loop does, because everything it branches on is either the same on every rank (the
batch order, the step count, the epoch) or first made the same by one of these calls
(the stop decision, the validation metrics, the global training loss).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")


class Parallel:
    """One process: the whole batch is this process's, and it decides alone."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This process's share of a global batch of sample indices, and how many of
        them count (see ProcessGroup.shard)."""
        return batch, batch.shape[0]

    def agree_to_stop(self, local: bool) -> bool:
        """Rank 0's `local` decision, on every rank."""
        return local

    def sum_loss(self, loss_sum: torch.Tensor, samples: int) -> tuple[float, int]:
        """The running loss sum and sample count over all ranks (a host sync)."""
        return loss_sum.item(), samples

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` (any picklable object), on every rank."""
        return value

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        return [value]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training steps call: `model` itself, or a DDP wrapper whose
        backward averages gradients across ranks."""
        return model


SINGLE_PROCESS = Parallel()


class ProcessGroup(Parallel):
    """This process's rank in the default torch.distributed process group, which the
    caller has initialised (worker/training/distributed.py) with one process per
    device."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        import torch.distributed as dist

        self.rank, self.world_size, self.device = rank, world_size, device
        self._dist = dist
        # The stop flag and pickled objects travel over gloo even beside NCCL: a CPU
        # tensor needs no CUDA stream sync, so polling the flag before every step does
        # not make the host wait for the GPU (the loop syncs only every `sync_every`).
        # Creating a group is itself collective: every rank does it here, in order.
        self._control = dist.new_group(backend="gloo") if device.type == "cuda" else None
        self._flag = torch.zeros(1, dtype=torch.int32)

    def shard(self, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Contiguous near-equal parts of the global batch, part `rank` for this rank.

        A batch with fewer samples than ranks (an epoch's short last batch) leaves some
        ranks without a sample; such a rank still runs the step on the batch's first
        sample with weight 0 (the count returned is 0), because DDP's backward is a
        collective that every rank must join, and an empty batch breaks some models
        (an LSTM cannot reshape zero rows)."""
        mine = batch.tensor_split(self.world_size)[self.rank]
        if mine.shape[0] == 0:
            return batch[:1], 0
        return mine, mine.shape[0]

    def agree_to_stop(self, local: bool) -> bool:
        self._flag[0] = 1 if (local and self.rank == 0) else 0
        self._dist.broadcast(self._flag, src=0, group=self._control)
        return bool(self._flag[0])

    def sum_loss(self, loss_sum: torch.Tensor, samples: int) -> tuple[float, int]:
        pair = torch.stack(
            [loss_sum.detach().to(torch.float64), loss_sum.new_tensor(samples, dtype=torch.float64)]
        )
        self._dist.all_reduce(pair)
        total, count = pair.tolist()
        return float(total), round(count)

    def broadcast(self, value: T) -> T:
        box: list[Any] = [value if self.rank == 0 else None]
        self._dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]  # type: ignore[no-any-return]

    def gather(self, value: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, value, group=self._control)
        return out

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (BatchNorm's running statistics) are synced from rank 0 before each
        # forward, so every rank evaluates and checkpoints rank 0's.
        return DistributedDataParallel(model, device_ids=device_ids)
