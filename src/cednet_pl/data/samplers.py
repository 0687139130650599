"""Samplers of the DataModules: an epoch-seeded training order that DDP shards exactly, and unpadded eval shards.

Training: `torch.utils.data.DistributedSampler(shuffle=True, seed=s)` draws the permutation of epoch `e` from a
generator seeded with `s + e` and gives rank `r` of `W` the positions r, r + W, r + 2W, ... (padded with the first
indices to a multiple of W). With one replica it is the whole permutation, so the W ranks' k-th batches of size `b`
together are exactly the k-th batch of one process with batch `W * b`, and a run resumed at epoch `e` sees the same
order as an uninterrupted one (Lightning calls `set_epoch`). Lightning keeps a `DistributedSampler` it is given
instead of replacing it with one seeded from `PL_GLOBAL_SEED`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler

__all__ = ["EpochSeededSampler", "current_epoch", "exact_eval_sampler", "sample_seed", "train_sampler"]


class EpochSeededSampler(DistributedSampler):
    """`DistributedSampler` with shuffling that depends only on `seed` and the epoch; optionally `(index, epoch)`.

    With `with_epoch=True` it yields `(index, epoch)` pairs, so a dataset can seed its per-sample augmentation from
    them (Lightning creates the first iterator of a resumed run, and prefetches from it, before the epoch-start
    hooks run).

    Args:
        dataset: The training dataset (only its length is used).
        seed: Base seed of the permutation (the DataModule's `shuffle_seed`).
        num_replicas: World size (default 1: a single process).
        rank: This rank (default 0).
        with_epoch: Yield `(index, epoch)` instead of `index`.
    """

    def __init__(
        self,
        dataset: Sized,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        with_epoch: bool = False,
    ):
        if len(dataset) <= 0:
            raise ValueError(f"cannot sample from an empty dataset (len {len(dataset)})")
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=False
        )
        self.with_epoch = with_epoch

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        shard = super().__iter__()
        return ((i, epoch) for i in shard) if self.with_epoch else shard


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation in one epoch (for `(index, epoch)` keys of `EpochSeededSampler`)."""
    return (int(seed) * 1_000_003 + int(epoch)) * 1_000_003 + int(index)


def _dist_world() -> tuple[int, int] | None:
    """(world_size, rank) of an initialised process group with more than one rank, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_world_size(), dist.get_rank()


def train_sampler(
    dataset: Any, seed: int = 0, with_epoch: bool = False, trainer: object | None = None
) -> EpochSeededSampler:
    """Sampler for training loaders: the epoch-seeded permutation, sharded over the ranks of a process group.

    Args:
        dataset: The training dataset (map-style).
        seed: Base seed of the per-epoch permutation.
        with_epoch: Yield `(index, epoch)` pairs (for per-sample augmentation seeds).
        trainer: The DataModule's trainer: the sampler starts at the epoch it is about to run (Lightning builds,
            and prefetches from, a resumed run's first iterator before it calls `set_epoch`).
    """
    world_size, rank = _dist_world() or (1, 0)
    sampler = EpochSeededSampler(
        dataset, seed=seed, num_replicas=world_size, rank=rank, with_epoch=with_epoch
    )
    sampler.set_epoch(current_epoch(trainer))
    return sampler


def exact_eval_sampler(dataset: Any) -> Any:
    """Sampler for validation/test loaders that gives every sample to exactly one rank (no padding).

    Lightning's default `DistributedSampler` pads the dataset to a multiple of the world size by repeating samples,
    so metrics over the padded set are off when `len(dataset) % world_size != 0`. This returns Lightning's
    `UnrepeatedDistributedSampler` (a `DistributedSampler` subclass, so Lightning does not replace it; ranks get
    `ceil` or `floor` of `len / world_size` samples) when a process group with more than one rank exists, else None
    (plain sequential loading). Metrics must then be synced by torchmetrics (sums of states), not by per-step
    collectives, since ranks may run a different number of batches.

    Args:
        dataset: The evaluation dataset (map-style).
    """
    world = _dist_world()
    if world is None:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world[0], rank=world[1], shuffle=False)


def current_epoch(trainer: object | None) -> int:
    """The epoch Lightning is about to run (what it will pass to `set_epoch`), 0 without a trainer."""
    loop = getattr(trainer, "fit_loop", None)
    try:
        return int(loop.epoch_progress.current.processed)  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return 0
