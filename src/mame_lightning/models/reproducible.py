"""Random draws of a training step that depend only on (seed, stream, step, micro-batch, rank).

A run resumed from a checkpoint then draws exactly the numbers an uninterrupted run would have drawn,
whatever the global RNG did in between.
"""

from __future__ import annotations

import numpy as np
import torch

# Generator streams keep training and validation draws apart even at the same step/batch.
TRAIN_STREAM, VAL_STREAM = 0, 1


def step_generator(
    seed: int, step: int, batch_idx: int, rank: int, device: torch.device | str, stream: int = TRAIN_STREAM
) -> torch.Generator:
    """A generator whose state depends only on its arguments, never on the global RNG.

    SeedSequence mixes the tuple so neighbouring steps get unrelated streams.
    """
    words = np.random.SeedSequence([int(seed), int(stream), int(step), int(batch_idx), int(rank)])
    high, low = (int(w) for w in words.generate_state(2, dtype=np.uint32))
    return torch.Generator(device=device).manual_seed(((high << 32) | low) & (2**63 - 1))


__all__ = ["TRAIN_STREAM", "VAL_STREAM", "step_generator"]
