"""A training sampler whose order is a pure function of (seed, position), so resuming is exact.

Training is counted in optimizer steps, not epochs. The sampler yields an endless stream of
seeded permutations (one per pass over the data) and can start at any position: a run resumed
from a checkpoint at step k starts the stream at the k-th micro-batch and sees exactly the batches
an uninterrupted run would have seen. Under DDP each rank takes every world_size-th batch-sized
slice of the same stream, so ranks never overlap and no DistributedSampler is needed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def pass_permutation(n: int, seed: int, pass_index: int) -> torch.Tensor:
    """The order of pass `pass_index` over n items: same seed and pass, same order."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(pass_index))
    return torch.randperm(n, generator=generator)


class ResumableStreamSampler(Sampler[int]):
    """Endless seeded index stream, sliced per rank, starting at micro-batch `start_batch`.

    `start_batch` counts micro-batches per rank already consumed (global_step × accumulation).
    The stream has no length, so Lightning treats the loader as step-based (max_steps).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size

    @classmethod
    def for_trainer(cls, n: int, batch_size: int, seed: int, trainer=None) -> "ResumableStreamSampler":
        """Start where the (possibly restored) trainer is: global_step × accumulation micro-batches."""
        if trainer is None:
            return cls(n, batch_size, seed=seed)
        start = trainer.global_step * trainer.accumulate_grad_batches
        return cls(n, batch_size, seed=seed, start_batch=start, rank=trainer.global_rank,
                   world_size=trainer.world_size)

    def _global_position(self, local_batch: int) -> int:
        """Index into the global stream of the first item of this rank's local batch."""
        return (local_batch * self.world_size + self.rank) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        local_batch = self.start_batch
        cached_pass, perm = -1, None
        while True:
            start = self._global_position(local_batch)
            for pos in range(start, start + self.batch_size):
                pass_index, offset = divmod(pos, self.n)
                if pass_index != cached_pass:
                    cached_pass, perm = pass_index, pass_permutation(self.n, self.seed, pass_index)
                yield int(perm[offset])
            local_batch += 1
