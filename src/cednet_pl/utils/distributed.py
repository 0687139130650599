"""Rank and Slurm helpers: launch validation, per-rank Hydra/logging setup, exact distributed evaluation.

Three ways a multi-process run starts, all with `strategy: ddp` (configs `trainer/ddp*.yaml`):

- `srun cednet-train ...` inside an sbatch job (`scripts/slurm/train.sbatch`): Slurm starts one process per task,
  Lightning's `SLURMEnvironment` reads ranks from `SLURM_*`;
- `cednet-train -m hydra/launcher=slurm ...`: hydra-submitit-launcher writes and submits the sbatch script, then
  every srun task runs the Hydra job (again `SLURMEnvironment`);
- `cednet-train trainer=ddp trainer.devices=N` on one machine: Lightning's launcher re-runs the command for local
  ranks 1..N-1.

Lightning's `SLURMEnvironment` is the single requeue owner: `#SBATCH --signal=SIGUSR1@90` makes it save
`hpc_ckpt_<n>.ckpt` in the run dir and `scontrol requeue` the job; submitit's own USR2 handler is never signalled
(the launcher preset replaces submitit's `--signal`). A requeued job keeps its `SLURM_JOB_ID` and its run dir
(train.sbatch passes `hydra.run.dir=<log_dir>/<task>/runs/slurm-<jobid>`; a submitit job re-runs its pickled sweep
config) and resumes from the newest of `hpc_ckpt_*.ckpt` / `checkpoints/last.ckpt` (`ckpt_path: auto`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)
#: Per-rank progress lines (kept at INFO on non-zero ranks: one "joined" line per rank, nothing else).
rank_log = logging.getLogger("cednet_pl.rank")

#: Slurm job names that Lightning treats as an interactive allocation (it then uses its own launcher).
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")
#: Environment variables by which other multi-node launchers (torchrun, LSF, MPI, Kubeflow, manual) are recognised.
_MULTINODE_LAUNCHER_VARS = (
    "NODE_RANK",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
    "LSB_JOBID",
    "OMPI_COMM_WORLD_SIZE",
)
#: Hydra overrides a non-zero rank adds to its command line: no `.hydra/` config copy, log to stdout not a file.
_NONZERO_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stdout")


class LaunchConfigError(ValueError):
    """The process layout (Slurm allocation, launcher) does not match the trainer config."""


def slurm_gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """GPUs to request per node for a trainer: `devices` on GPU accelerators, None (no GPU request) on CPU.

    Registered as the OmegaConf resolver `cednet_slurm_gpus` (used by `hydra/launcher=slurm`).
    """
    if str(accelerator).lower() == "cpu":
        return None
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    return None


OmegaConf.register_new_resolver("cednet_slurm_gpus", slurm_gpus_per_node, replace=True)


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def slurm_managed(env: Mapping[str, str] | None = None) -> bool:
    """Whether Lightning will take ranks from Slurm (its `SLURMEnvironment.detect()` rule).

    True when `SLURM_NTASKS` is set and the job is not an interactive allocation (job name `bash`/`interactive`),
    i.e. Slurm, not Lightning, starts the processes.
    """
    env = _env(env)
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in _INTERACTIVE_JOB_NAMES


def global_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank as known before the process group exists (0 when not distributed).

    Order: `RANK` (torchrun), `SLURM_PROCID` (srun), then `LOCAL_RANK` on node `NODE_RANK` (Lightning's launcher;
    a process on node > 0 counts as rank >= 1).
    """
    env = _env(env)
    if "RANK" in env:
        return int(env["RANK"])
    if slurm_managed(env) and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    local = int(env.get("LOCAL_RANK", 0))
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    return local if node == 0 else max(1, local + node)


def is_global_zero(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is global rank zero (the one that writes outputs)."""
    return global_rank(env) == 0


def _parse_tasks_per_node(value: str) -> int:
    """First count of a Slurm per-node list such as `8`, `8(x4)` or `8(x3),4`."""
    match = re.match(r"\s*(\d+)", value)
    if match is None:
        raise LaunchConfigError(
            f"cannot parse SLURM_NTASKS_PER_NODE={value!r} (expected e.g. '8' or '8(x4)')"
        )
    return int(match.group(1))


def resolve_devices(devices: Any, accelerator: Any = "auto") -> int | None:
    """Number of processes per node that a trainer `devices` value asks for (None when it cannot be known here).

    Args:
        devices: `trainer.devices`: an int, a digit string, a list/tuple of device ids, or "auto"/-1.
        accelerator: `trainer.accelerator`; "auto"/-1 devices mean 1 process on CPU and all visible GPUs on GPU.
    """
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if devices in ("auto", -1, "-1", None):
        accel = str(accelerator or "auto").lower()
        if accel == "cpu":
            return 1
        import torch

        if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()):
            return torch.cuda.device_count() or None
        return 1 if accel == "auto" else None
    return None


def validate_launch(
    trainer_cfg: Mapping[str, Any] | DictConfig, env: Mapping[str, str] | None = None
) -> None:
    """Check that the process layout matches `trainer.devices` / `trainer.num_nodes` before anything blocks.

    A mismatch otherwise hangs at "Initializing distributed" until the NCCL/gloo timeout (30 min) or fails deep
    inside Trainer construction. Call it at the start of `train()`/`evaluate()`.

    Args:
        trainer_cfg: The `trainer` config node (devices, num_nodes, accelerator).
        env: Environment to read (default: `os.environ`).

    Raises:
        LaunchConfigError: naming the Slurm variable / sbatch option and the trainer key that disagree.
    """
    env = _env(env)
    devices_value = trainer_cfg.get("devices", "auto")
    accelerator = trainer_cfg.get("accelerator", "auto")
    num_nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    devices = resolve_devices(devices_value, accelerator)

    if slurm_managed(env):
        ntasks = int(env["SLURM_NTASKS"])
        job = env.get("SLURM_JOB_ID", "?")
        if ntasks > 1 and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
            raise LaunchConfigError(
                f"Slurm job {job} has SLURM_NTASKS={ntasks} but this process was started by the batch script "
                f"itself, not by srun, so only 1 of the {ntasks} ranks exists and training would hang. "
                f"Launch with `srun cednet-train ...` inside the sbatch script (see scripts/slurm/train.sbatch)."
            )
        per_node_raw = env.get("SLURM_NTASKS_PER_NODE")
        if per_node_raw is None:
            if ntasks > 1:
                raise LaunchConfigError(
                    f"Slurm job {job} was submitted with --ntasks={ntasks} but no --ntasks-per-node; Lightning "
                    f"needs one task per device on every node: submit with --nodes=N --ntasks-per-node="
                    f"<trainer.devices>"
                )
            per_node = 1
        else:
            per_node = _parse_tasks_per_node(per_node_raw)
        nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        if devices is not None and per_node != devices:
            raise LaunchConfigError(
                f"Slurm job {job} runs {per_node} task(s) per node (SLURM_NTASKS_PER_NODE={per_node_raw}, sbatch "
                f"--ntasks-per-node) but trainer.devices={devices_value!r} asks for {devices} process(es) per node. "
                f"They must be equal: pass trainer.devices={per_node} or submit with --ntasks-per-node={devices}."
            )
        if nnodes != num_nodes:
            raise LaunchConfigError(
                f"Slurm job {job} has {nnodes} node(s) (SLURM_NNODES={nnodes}, sbatch --nodes) but "
                f"trainer.num_nodes={num_nodes}. They must be equal: pass trainer.num_nodes={nnodes} or submit "
                f"with --nodes={num_nodes}."
            )
        return

    if num_nodes > 1 and not any(var in env for var in _MULTINODE_LAUNCHER_VARS):
        raise LaunchConfigError(
            f"trainer.num_nodes={num_nodes} but no multi-node launcher was found (not inside a Slurm job step, "
            f"no NODE_RANK/torchrun variables): the run would wait forever for the other nodes. Submit with "
            f"scripts/slurm/train.sbatch (--nodes={num_nodes}) or `cednet-train -m hydra/launcher=slurm`, "
            f"or set trainer.num_nodes=1."
        )


def rank_hydra_overrides(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """Hydra overrides a non-zero rank appends to its command line so it writes nothing into the run dir.

    Under `srun` (and in the children of Lightning's launcher) every rank runs the Hydra app; without these, each
    rank would rewrite `.hydra/*.yaml` and append to the same job log file. Keys already on the command line are
    left alone (Lightning's launcher adds `hydra.output_subdir=null` itself).

    Args:
        argv: The command line (without the program name).
        env: Environment to read (default: `os.environ`).

    Returns:
        The overrides to append (empty on rank zero).
    """
    if is_global_zero(env):
        return []
    present = {arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg}
    return [o for o in _NONZERO_RANK_OVERRIDES if o.split("=", 1)[0] not in present]


def add_rank_hydra_overrides(argv: list[str], env: Mapping[str, str] | None = None) -> None:
    """Append `rank_hydra_overrides` to `argv` (e.g. `sys.argv`) in place; call it before the Hydra main runs."""
    argv.extend(rank_hydra_overrides(argv[1:], env))


def quiet_nonzero_ranks(output_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> bool:
    """On a non-zero rank: log WARNING and above only, and never into files under the run dir.

    Covers the case where the rank's Hydra logging was configured like rank zero's (hydra-submitit-launcher runs the
    same Hydra job in every task): file handlers writing under `output_dir` are removed from the root logger.

    Args:
        output_dir: The run dir; file handlers writing below it are dropped (all file handlers when None).
        env: Environment to read (default: `os.environ`).

    Returns:
        True when this process is a non-zero rank and was quieted.
    """
    if is_global_zero(env):
        return False
    root = logging.getLogger()
    out = Path(output_dir).resolve() if output_dir is not None else None
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            path = Path(handler.baseFilename).resolve()
            if out is None or out == path.parent or out in path.parents:
                root.removeHandler(handler)
                handler.close()
    root.setLevel(logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "cednet_pl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    rank_log.setLevel(logging.INFO)
    return True


def check_local_multirun(
    trainer_cfg: Mapping[str, Any] | DictConfig, env: Mapping[str, str] | None = None
) -> None:
    """Refuse a Hydra `--multirun` that would start Lightning's own DDP launcher (more than one local process).

    Lightning's launcher re-runs the command line, `-m` and the sweep included, in every child process, which
    starts nested sweeps and hangs (Lightning removed Hydra multirun support for this reason). Sweeps of DDP runs go
    through `hydra/launcher=slurm`, where srun starts the processes.

    Raises:
        LaunchConfigError: in a local multirun job with more than one device or node.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if slurm_managed(env) or not HydraConfig.initialized():
        return
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    devices = resolve_devices(trainer_cfg.get("devices", 1), trainer_cfg.get("accelerator", "auto")) or 1
    num_nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if devices * num_nodes > 1:
        raise LaunchConfigError(
            f"--multirun with a local multi-process trainer (trainer.devices={trainer_cfg.get('devices')!r}, "
            f"trainer.num_nodes={num_nodes}) is not supported: Lightning's DDP launcher would re-run the sweep in "
            f"every process. Sweep on Slurm with `-m hydra/launcher=slurm`, or run the configurations one by one."
        )


def setup_distributed_run(trainer_cfg: Mapping[str, Any] | DictConfig, output_dir: str | Path) -> None:
    """Validate the launch layout, then quiet non-zero ranks; the first thing `train()` / `evaluate()` do."""
    validate_launch(trainer_cfg)
    check_local_multirun(trainer_cfg)
    quiet_nonzero_ranks(output_dir)
    if slurm_managed():
        log.info(
            f"Slurm job {os.environ.get('SLURM_JOB_ID')} rank {global_rank()}/{os.environ.get('SLURM_NTASKS')} "
            f"(restart {os.environ.get('SLURM_RESTART_COUNT', '0')})"
        )


class DistributedRunReport(L.Callback):
    """Log the distributed layout and the training progress in a form that survives requeues.

    Every rank logs one line once its process group is up (`rank R/W joined the process group ...`); rank zero
    logs where fitting (re)starts (`fit start: epoch E global_step G ...`) and each epoch this process finished
    (`epoch E done: global_step G`). The epoch line is written once all of the epoch's hooks have run, checkpoint
    saving included (at the next epoch's start, or at the end of training), so a job log shows which epochs a
    requeued run may skip and that it continued instead of repeating them.
    """

    def __init__(self) -> None:
        self._finished: tuple[int, int] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size < 2:
            return
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
        rank_log.info(
            f"rank {trainer.global_rank}/{trainer.world_size} joined the process group (backend {backend}, "
            f"node {trainer.node_rank} {os.uname().nodename}, local rank {trainer.local_rank}, "
            f"slurm job {os.environ.get('SLURM_JOB_ID', '-')})"
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished = None
        if trainer.is_global_zero:
            rank_log.info(
                f"fit start: epoch {trainer.current_epoch} global_step {trainer.global_step} "
                f"world_size {trainer.world_size} restart {os.environ.get('SLURM_RESTART_COUNT', '0')} "
                f"ckpt {trainer.ckpt_path or '-'}"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished = (trainer.current_epoch, trainer.global_step)

    def _report_finished(self, trainer: L.Trainer) -> None:
        if self._finished is not None and trainer.is_global_zero:
            rank_log.info(f"epoch {self._finished[0]} done: global_step {self._finished[1]}")
        self._finished = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report_finished(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report_finished(trainer)


def _dist_world() -> tuple[int, int] | None:
    """(world_size, rank) of an initialised process group with more than one rank, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_world_size(), dist.get_rank()


class EpochSeededDistributedSampler(DistributedSampler):
    """Shard of the single-process epoch permutation: rank `r` of `W` takes positions r, r + W, r + 2W, ...

    The permutation is `EpochSeededRandomSampler(len(dataset), seed)`'s for the epoch, so with a per-rank batch `b`
    the W ranks' k-th batches together are exactly the k-th batch of a single process with batch `W * b`: a DDP run
    sees the same global batches as a one-process run, and a resumed run the same as an uninterrupted one.
    (Lightning's own wrapper would re-shuffle the indices with `PL_GLOBAL_SEED` instead.) As in
    `DistributedSampler`, the epoch is padded with its first indices to a multiple of W.

    Args:
        dataset: The training dataset (only its length is used).
        seed: Base seed of the permutation (the DataModule's `shuffle_seed`).
        num_replicas: World size (default: the process group's).
        rank: This rank (default: the process group's).
        with_epoch: Yield `(index, epoch)` pairs like `EpochSeededRandomSampler(with_epoch=True)`.
    """

    def __init__(
        self,
        dataset: Any,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        with_epoch: bool = False,
    ):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.with_epoch = with_epoch

    def __iter__(self) -> Iterator[Any]:
        from cednet_pl.utils.data import EpochSeededRandomSampler

        epoch = self.epoch
        order = EpochSeededRandomSampler(len(self.dataset), self.seed)
        order.set_epoch(epoch)
        indices = list(order)
        indices += indices[: self.total_size - len(indices)]
        shard = indices[self.rank : self.total_size : self.num_replicas]
        return iter([(i, epoch) for i in shard] if self.with_epoch else shard)


def train_sampler(dataset: Any, seed: int = 0, with_epoch: bool = False) -> Any:
    """Sampler for training loaders: the epoch-seeded permutation, sharded over ranks when distributed.

    Returns `EpochSeededRandomSampler` in a single process and `EpochSeededDistributedSampler` under DDP (a
    `DistributedSampler` subclass, so Lightning keeps it).

    Args:
        dataset: The training dataset (map-style).
        seed: Base seed of the per-epoch permutation.
        with_epoch: Yield `(index, epoch)` pairs (for per-sample augmentation seeds).
    """
    world = _dist_world()
    if world is None:
        from cednet_pl.utils.data import EpochSeededRandomSampler

        return EpochSeededRandomSampler(len(dataset), seed, with_epoch=with_epoch)
    return EpochSeededDistributedSampler(
        dataset, seed=seed, num_replicas=world[0], rank=world[1], with_epoch=with_epoch
    )


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


def require_slurm_commands(commands: Sequence[str] = ("sbatch", "srun")) -> None:
    """Raise a clear error when a Slurm client command is missing from PATH.

    Raises:
        LaunchConfigError: naming the missing commands and what to do instead.
    """
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise LaunchConfigError(
            f"hydra/launcher=slurm submits jobs with sbatch, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH: this machine is not a Slurm login node. "
            f"Run without `hydra/launcher=slurm` (local runs), or on the cluster's login node."
        )


def check_slurm_launcher(config: DictConfig) -> None:
    """Validate a `hydra/launcher=slurm` multirun before anything is submitted.

    Checks that Slurm's client commands exist and that the launcher's `tasks_per_node` / `nodes` equal the trainer's
    `devices` / `num_nodes` as integers (sweeps that change them per job are caught again at job start).

    Raises:
        LaunchConfigError: on a missing sbatch or a layout mismatch.
    """
    require_slurm_commands()
    launcher = config.hydra.launcher
    trainer = config.get("trainer") or {}
    devices = trainer.get("devices", 1)
    num_nodes = trainer.get("num_nodes", 1)
    if (
        resolve_devices(devices, "cpu") is None
        or isinstance(devices, Sequence)
        or devices in ("auto", -1, "-1")
    ):
        raise LaunchConfigError(
            f"hydra/launcher=slurm needs trainer.devices as a positive int (it becomes sbatch --ntasks-per-node), "
            f"got {devices!r}: pass e.g. trainer.devices=8"
        )
    tasks = OmegaConf.select(launcher, "tasks_per_node")
    nodes = OmegaConf.select(launcher, "nodes")
    if int(tasks) != int(devices):
        raise LaunchConfigError(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}; keep the preset's "
            f"`tasks_per_node: ${{trainer.devices}}` or make them equal"
        )
    if int(nodes) != int(num_nodes):
        raise LaunchConfigError(
            f"hydra.launcher.nodes={nodes} but trainer.num_nodes={num_nodes}; keep the preset's "
            f"`nodes: ${{trainer.num_nodes}}` or make them equal"
        )


class SlurmLauncherCheck(HydraCallback):
    """Hydra callback of the `hydra/launcher=slurm` preset: fail fast, with a clear message, before submitting."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # NOTE: Hydra turns exceptions raised by callbacks into warnings and carries on; SystemExit stops the sweep
        try:
            check_slurm_launcher(config)
        except LaunchConfigError as e:
            raise SystemExit(f"Error: {e}") from e

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        log.warning(
            "hydra/launcher=slurm only takes effect with --multirun (-m); this run executes locally. Use "
            "`cednet-train -m hydra/launcher=slurm ...` to submit, or scripts/slurm/train.sbatch."
        )
