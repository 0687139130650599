"""Data-loading helpers shared by the DataModules."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededRandomSampler(Sampler):
    """Random permutation that depends only on `seed` and the epoch (set by Lightning through `set_epoch`).

    Unlike `RandomSampler` (which draws from the global RNG when iteration starts), the order of epoch k is the
    same in an uninterrupted run and in a run resumed at epoch k. With `with_epoch=True` it yields
    `(index, epoch)` pairs, so a dataset can seed its per-sample augmentation from them (Lightning creates the
    first iterator of a resumed run, and prefetches from it, before the epoch-start hooks run).

    Args:
        num_samples: Dataset length.
        seed: Base seed.
        with_epoch: Yield `(index, epoch)` instead of `index`.
    """

    def __init__(self, num_samples: int, seed: int = 0, with_epoch: bool = False):
        if num_samples <= 0:
            raise ValueError(f"cannot sample from an empty dataset (num_samples={num_samples})")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.with_epoch = with_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        epoch = self.epoch
        gen = torch.Generator()
        gen.manual_seed(self.seed + 7919 * epoch)
        order = torch.randperm(self.num_samples, generator=gen).tolist()
        if self.with_epoch:
            yield from ((i, epoch) for i in order)
        else:
            yield from order

    def __len__(self) -> int:
        return self.num_samples


def current_epoch(trainer: object | None) -> int:
    """The epoch Lightning is about to run (what it will pass to `set_epoch`), 0 without a trainer."""
    loop = getattr(trainer, "fit_loop", None)
    try:
        return int(loop.epoch_progress.current.processed)  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return 0
