"""Launch validation: the Slurm allocation / launcher layout against the trainer config, and the Slurm launcher preset.

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
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

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
