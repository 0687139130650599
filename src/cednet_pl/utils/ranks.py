"""Rank of this process before the process group exists, and per-rank set-up (Hydra overrides, quiet logging).

Under `srun` and in the children of Lightning's DDP launcher every rank runs the whole Hydra app; rank zero alone
writes into the run dir, the other ranks log warnings only (plus Lightning's own "Initializing distributed" line).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cednet_pl.utils.slurm import _env, check_local_multirun, slurm_managed, validate_launch

log = logging.getLogger(__name__)
#: Per-rank progress lines (kept at INFO on non-zero ranks).
rank_log = logging.getLogger("cednet_pl.rank")
#: Lightning's logger of "Initializing distributed: GLOBAL_RANK: r, MEMBER: r+1/W" (kept at INFO on every rank).
_JOIN_LOGGER = "lightning.fabric.utilities.distributed"
#: Hydra overrides a non-zero rank adds to its command line: no `.hydra/` config copy, log to stdout not a file.
_NONZERO_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stdout")


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
    logging.getLogger(_JOIN_LOGGER).setLevel(logging.INFO)
    return True


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
