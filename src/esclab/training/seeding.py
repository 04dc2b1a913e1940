"""Randomness that depends on (seed, epoch) alone, so a resumed fold replays an uninterrupted one.

Lightning restores the weights, optimizer, scheduler and callback states from a
checkpoint but not the random generators. Drawing each epoch's shuffle, dropout
masks and augmentations from a seed derived from the epoch number makes epoch k
the same whether the process started at epoch 0 or resumed at k.
"""

import lightning as L
import torch


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 100_003 + epoch) % 2**32


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a permutation of range(n)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


class EpochSeed(L.Callback):
    """Re-seeds torch, numpy and random at the start of every training epoch."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module):
        L.seed_everything(epoch_seed(self.seed, trainer.current_epoch), workers=True, verbose=False)
