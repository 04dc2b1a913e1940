"""Randomness that depends on (seed, epoch, batch) alone, so a resumed fold replays an uninterrupted one.

Lightning restores the weights, optimizer, scheduler and callback states from a
checkpoint but not the random generators, and how many numbers get drawn
between two batches (DataLoader iterators draw one each when they start)
differs between a process that resumed and one that did not. Drawing each
epoch's shuffle from (seed, epoch), and each batch's dropout masks and
augmentations from (seed, epoch, batch), makes every step the same either way.
"""

import lightning as L
import torch


def derived_seed(seed: int, *counters: int) -> int:
    for counter in counters:
        seed = seed * 100_003 + counter
    return seed % 2**32


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a permutation of range(n)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))


class BatchSeed(L.Callback):
    """Re-seeds torch, numpy and random before every training batch."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Each DDP process its own draws (its share of the batch its own augmentations); one process as before.
        rank = (trainer.global_rank,) if trainer.world_size > 1 else ()
        L.seed_everything(derived_seed(self.seed, trainer.current_epoch, batch_idx, *rank), workers=True,
                          verbose=False)
