"""Rank/Slurm helpers (`cednet_pl.utils.slurm`, `cednet_pl.utils.ranks`) and the samplers (`cednet_pl.data.samplers`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import OmegaConf, open_dict, read_write

from cednet_pl.data.samplers import EpochSeededSampler, exact_eval_sampler, train_sampler
from cednet_pl.utils.ranks import global_rank, quiet_nonzero_ranks, rank_hydra_overrides, rank_log
from cednet_pl.utils.slurm import (
    LaunchConfigError,
    check_local_multirun,
    resolve_devices,
    slurm_gpus_per_node,
    validate_launch,
)

#: Environment of task 0 of `sbatch --nodes=1 --ntasks-per-node=2` started by srun.
SRUN_ENV = {
    "SLURM_JOB_ID": "42",
    "SLURM_JOB_NAME": "cednet",
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_STEP_ID": "0",
}
CPU2 = {"accelerator": "cpu", "devices": 2, "num_nodes": 1}


def test_validate_launch_accepts_matching_slurm_layout() -> None:
    validate_launch(CPU2, SRUN_ENV)
    validate_launch(
        {"accelerator": "gpu", "devices": 8, "num_nodes": 4},
        {**SRUN_ENV, "SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "8(x4)", "SLURM_NNODES": "4"},
    )


def test_validate_launch_devices_vs_tasks_per_node() -> None:
    with pytest.raises(LaunchConfigError) as err:
        validate_launch({**CPU2, "devices": 3}, SRUN_ENV)
    msg = str(err.value)
    assert "SLURM_NTASKS_PER_NODE=2" in msg and "trainer.devices=3" in msg and "--ntasks-per-node=3" in msg


def test_validate_launch_nodes_vs_num_nodes() -> None:
    with pytest.raises(LaunchConfigError, match=r"SLURM_NNODES=2.*trainer.num_nodes=1"):
        validate_launch(CPU2, {**SRUN_ENV, "SLURM_NNODES": "2", "SLURM_NTASKS": "4"})


def test_validate_launch_multi_task_job_without_srun() -> None:
    env = {k: v for k, v in SRUN_ENV.items() if k != "SLURM_STEP_ID"}
    with pytest.raises(LaunchConfigError, match=r"not by srun.*srun cednet-train"):
        validate_launch(CPU2, env)


def test_validate_launch_ntasks_without_per_node() -> None:
    env = {k: v for k, v in SRUN_ENV.items() if k != "SLURM_NTASKS_PER_NODE"}
    with pytest.raises(LaunchConfigError, match=r"--ntasks=2 but no --ntasks-per-node"):
        validate_launch(CPU2, env)


def test_validate_launch_ignores_interactive_allocation() -> None:
    """Inside `salloc` (job name bash/interactive) Lightning starts the processes itself: nothing to compare."""
    validate_launch({**CPU2, "devices": 3}, {**SRUN_ENV, "SLURM_JOB_NAME": "interactive"})


def test_validate_launch_multi_node_outside_slurm() -> None:
    with pytest.raises(LaunchConfigError, match=r"trainer.num_nodes=2 but no multi-node launcher"):
        validate_launch({**CPU2, "num_nodes": 2}, {})
    validate_launch({**CPU2, "num_nodes": 2}, {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"})


def test_resolve_devices() -> None:
    assert resolve_devices(4) == 4
    assert resolve_devices("3") == 3
    assert resolve_devices([0, 2]) == 2
    assert resolve_devices("0,1,2") == 3
    assert resolve_devices("auto", "cpu") == 1
    assert resolve_devices(-1, "cpu") == 1


def test_slurm_gpus_per_node() -> None:
    assert slurm_gpus_per_node("cpu", 2) is None
    assert slurm_gpus_per_node("gpu", 8) == 8
    assert slurm_gpus_per_node("auto", "4") == 4
    assert slurm_gpus_per_node("gpu", "auto") is None


def test_global_rank_sources() -> None:
    assert global_rank({}) == 0
    assert global_rank({**SRUN_ENV, "SLURM_PROCID": "3"}) == 3
    assert global_rank({**SRUN_ENV, "SLURM_PROCID": "3", "SLURM_JOB_NAME": "bash", "LOCAL_RANK": "1"}) == 1
    assert global_rank({"RANK": "5", "LOCAL_RANK": "1"}) == 5
    assert global_rank({"LOCAL_RANK": "0", "NODE_RANK": "1"}) >= 1


def test_rank_hydra_overrides() -> None:
    assert rank_hydra_overrides(["trainer=ddp"], {**SRUN_ENV}) == []
    rank1 = {**SRUN_ENV, "SLURM_PROCID": "1"}
    assert rank_hydra_overrides(["trainer=ddp"], rank1) == [
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
    ]
    # Lightning's launcher already passes hydra.output_subdir=null to its children: not added twice
    child = [
        "trainer=ddp",
        "hydra.run.dir=x",
        "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null",
    ]
    assert rank_hydra_overrides(child, {"LOCAL_RANK": "1"}) == ["hydra/job_logging=stdout"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in ("lightning", "cednet_pl", "cednet_pl.rank")}
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)


@pytest.mark.usefixtures("restore_logging")
def test_quiet_nonzero_ranks(tmp_path: Path) -> None:
    run_log = logging.FileHandler(tmp_path / "train.log")
    other = logging.FileHandler(tmp_path.parent / f"{tmp_path.name}-elsewhere.log")
    root = logging.getLogger()
    root.addHandler(run_log)
    root.addHandler(other)
    assert not quiet_nonzero_ranks(tmp_path, {})  # rank zero: untouched
    assert run_log in root.handlers

    assert quiet_nonzero_ranks(tmp_path, {**SRUN_ENV, "SLURM_PROCID": "1"})
    assert run_log not in root.handlers and other in root.handlers
    assert root.level == logging.WARNING
    assert not logging.getLogger("cednet_pl.train").isEnabledFor(logging.INFO)
    assert rank_log.isEnabledFor(logging.INFO)
    # Lightning's per-rank "Initializing distributed: GLOBAL_RANK: r, MEMBER: r+1/W" line stays
    assert logging.getLogger("lightning.fabric.utilities.distributed").isEnabledFor(logging.INFO)
    root.removeHandler(other)
    other.close()


def test_epoch_seeded_distributed_sampler_matches_single_process() -> None:
    """W ranks with batch b see, step by step, exactly the batches of one process with batch W * b."""
    n, world, b = 103, 2, 8
    single = EpochSeededSampler(range(n), seed=3)
    for epoch in (0, 1):
        single.set_epoch(epoch)
        order = list(single)
        shards = []
        for rank in range(world):
            sampler = EpochSeededSampler(range(n), seed=3, num_replicas=world, rank=rank)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert [len(s) for s in shards] == [52, 52]  # padded to a multiple of the world size
        for k in range(n // (world * b)):
            together = sorted(i for s in shards for i in s[k * b : (k + 1) * b])
            assert together == sorted(order[k * world * b : (k + 1) * world * b])
        assert sorted(set(shards[0]) | set(shards[1])) == list(range(n))
    assert shards[0] != list(EpochSeededSampler(range(n), seed=3, num_replicas=2, rank=0))
    paired = EpochSeededSampler(range(n), seed=3, num_replicas=2, rank=1, with_epoch=True)
    paired.set_epoch(1)
    assert list(paired) == [(i, 1) for i in shards[1]]


def test_epoch_seeded_sampler_is_torchs_distributed_sampler_order() -> None:
    """The training order is exactly torch's `DistributedSampler(shuffle=True, seed)` order, for any world size."""
    from torch.utils.data import DistributedSampler

    for world in (1, 3):
        for rank in range(world):
            ours, torchs = (
                EpochSeededSampler(range(50), seed=7, num_replicas=world, rank=rank),
                DistributedSampler(range(50), num_replicas=world, rank=rank, shuffle=True, seed=7),
            )
            ours.set_epoch(2)
            torchs.set_epoch(2)
            assert list(ours) == list(torchs)
    with pytest.raises(ValueError, match="empty dataset"):
        EpochSeededSampler([])


def test_unpadded_eval_shards_cover_odd_set_once() -> None:
    n = 351
    shards = [
        list(UnrepeatedDistributedSampler(range(n), num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)
    ]
    assert [len(s) for s in shards] == [176, 175]
    assert sorted(shards[0] + shards[1]) == list(range(n))


def test_samplers_without_process_group() -> None:
    assert exact_eval_sampler(range(5)) is None
    assert isinstance(train_sampler(range(5), seed=1), EpochSeededSampler)
    assert next(iter(train_sampler(range(3), seed=1, with_epoch=True)))[1] == 0


def test_check_local_multirun(make_cfg) -> None:
    cfg = make_cfg("train", ["trainer=ddp_cpu"], fast=False)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    with pytest.raises(LaunchConfigError, match=r"--multirun with a local multi-process trainer"):
        check_local_multirun(cfg.trainer, {})
    check_local_multirun(OmegaConf.create({"devices": 1, "accelerator": "cpu"}), {})
    check_local_multirun(cfg.trainer, SRUN_ENV)  # srun tasks of a submitit sweep: fine
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
    HydraConfig().set_config(cfg)
    check_local_multirun(cfg.trainer, {})
