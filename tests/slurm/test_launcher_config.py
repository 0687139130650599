"""`hydra/launcher=slurm` and `scripts/slurm/*` plumbing and bad input, without a running cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from slurm_helpers import SLURM_SCRIPTS, TRAIN_SBATCH, SlurmUnavailable, start_cluster

from cednet_pl.utils.slurm import LaunchConfigError, check_slurm_launcher


def _fake_slurm_bin(tmp_path: Path) -> Path:
    """A directory with dummy `sbatch` and `srun` executables (never run: submission is not reached)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):
        exe = bin_dir / name
        exe.write_text("#!/bin/sh\nexit 99\n")
        exe.chmod(0o755)
    return bin_dir


def _launcher_params(cfg: DictConfig) -> dict:
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert isinstance(launcher, dict)
    return launcher


def test_launcher_preset_matches_trainer_cpu(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("train", ["hydra/launcher=slurm", "trainer=ddp_cpu"], fast=False)
    params = _launcher_params(cfg)
    assert params["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (1, 2, None)
    assert params["max_num_timeout"] == 0
    assert params["additional_parameters"] == {"signal": "USR1@90", "requeue": True}
    assert cfg.hydra.callbacks.slurm_check._target_ == "cednet_pl.utils.slurm.SlurmLauncherCheck"


def test_launcher_preset_sbatch_script_gpu_4x8(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sbatch script submitit writes for the README's 4 nodes x 8 GPUs sweep (same parameter mapping as
    hydra-submitit-launcher 1.2.0's `launch`)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = make_cfg(
        "train",
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4"],
        fast=False,
    )
    params = _launcher_params(cfg)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (4, 8, 8)
    monkeypatch.setenv("PATH", f"{_fake_slurm_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit", slurm_max_num_timeout=0)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = {"submitit_folder", "max_num_timeout", "_target_"}
    executor.update_parameters(
        **{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in skip}
    )
    script = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--signal=USR1@90",
        "--requeue",
        "--open-mode=append",
        "--time=2880",
    ):
        assert f"#SBATCH {line}" in script, (line, script)
    assert "USR2" not in script


def test_launcher_check_layout_and_missing_sbatch(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(_fake_slurm_bin(tmp_path)))
    check_slurm_launcher(make_cfg("train", ["hydra/launcher=slurm", "trainer=ddp_cpu"], fast=False))

    cfg = make_cfg(
        "train", ["hydra/launcher=slurm", "trainer=ddp_cpu", "hydra.launcher.tasks_per_node=3"], fast=False
    )
    with pytest.raises(LaunchConfigError, match=r"tasks_per_node=3 but trainer.devices=2"):
        check_slurm_launcher(cfg)
    cfg = make_cfg("train", ["hydra/launcher=slurm", "trainer=ddp"], fast=False)  # devices: auto
    with pytest.raises(LaunchConfigError, match=r"trainer.devices as a positive int.*'auto'"):
        check_slurm_launcher(cfg)

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cfg = make_cfg("train", ["hydra/launcher=slurm", "trainer=ddp_cpu"], fast=False)
    with pytest.raises(
        LaunchConfigError, match=r"sbatch, srun are not on PATH: this machine is not a Slurm login"
    ):
        check_slurm_launcher(cfg)


def test_cli_launcher_outside_slurm_fails_before_submitting(tmp_path: Path) -> None:
    """`cednet-train -m hydra/launcher=slurm` on a machine without sbatch: one clear error, nothing submitted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=str(Path(sys.executable).parent), CEDNET_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(
        [
            "cednet-train",
            "-m",
            "hydra/launcher=slurm",
            "trainer=ddp_cpu",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1
    assert (
        "Error: hydra/launcher=slurm submits jobs with sbatch, but sbatch, srun are not on PATH"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr and "submitit" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "sweep" / ".submitit").exists()


def test_train_sbatch_outside_slurm_and_without_tasks_per_node(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(TRAIN_SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "must be submitted with sbatch" in proc.stderr
    env.update(SLURM_JOB_ID="7", SLURM_NTASKS="8", SLURM_NNODES="1")
    proc = subprocess.run(["bash", str(TRAIN_SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no --ntasks-per-node" in proc.stderr


def test_cluster_tooling_reports_why_it_cannot_start(tmp_path: Path) -> None:
    """start_cluster.sh exits 2 with a reason (which the fixture turns into pytest.skip) instead of failing."""
    fake = tmp_path / "start.sh"
    fake.write_text("#!/bin/bash\necho 'cannot start slurm: must run as root (uid 1000)' >&2\nexit 2\n")
    with pytest.raises(SlurmUnavailable, match=r"must run as root \(uid 1000\)"):
        start_cluster(fake)
    if os.geteuid() == 0 and shutil.which("runuser") is not None:
        running = (
            subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False)
            if (shutil.which("sinfo"))
            else None
        )
        proc = subprocess.run(
            ["runuser", "-u", "nobody", "--", "bash", str(SLURM_SCRIPTS / "start_cluster.sh")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if running is not None and running.stdout.strip() in ("idle", "mix", "alloc"):
            assert proc.returncode == 0 and proc.stdout.startswith("already-running"), proc.stderr
        else:
            assert proc.returncode == 2 and "cannot start slurm: must run as root" in proc.stderr, proc.stderr


def test_readme_imagenet_4x8_command_composes(make_cfg: Callable[..., DictConfig]) -> None:
    """The overrides train.sbatch passes for the README's CEDNet-NeXt-T / ImageNet / 4 nodes x 8 GPUs job:
    trainer=ddp wins over the recipe's trainer, 128 images per GPU = 4096 per step, lr 4e-3 (the recipe's)."""
    from cednet_pl.lit.optim import resolve_lr

    cfg = make_cfg(
        "train",
        [
            "trainer=ddp",
            "trainer.num_nodes=4",
            "trainer.devices=8",
            "+experiment=cls_t",
            "data.root=/datasets/imagenet",
            "data.batch_size=128",
        ],
        fast=False,
    )
    t = cfg.trainer
    assert (t.strategy, t.accelerator, t.devices, t.num_nodes, t.max_epochs) == ("ddp", "gpu", 8, 4, 300)
    assert cfg.model.net.name == "cednet_next_tiny"
    global_batch = cfg.data.batch_size * t.devices * t.num_nodes * t.accumulate_grad_batches
    assert global_batch == 4096
    opt = cfg.model.optimizer
    assert resolve_lr(opt.lr, opt.base_lr, opt.base_batch_size, global_batch) == pytest.approx(4e-3)


def test_cluster_scripts_refuse_a_real_slurm_installation(tmp_path: Path) -> None:
    """start/stop_cluster.sh never use, rewrite or stop a Slurm whose slurm.conf they did not write.

    Runs copies of the scripts whose CONF points at a foreign slurm.conf under tmp_path (the check comes first).
    """
    foreign = tmp_path / "slurm.conf"
    foreign.write_text("ClusterName=production\nSlurmctldHost=head01\n")
    for script in ("start_cluster.sh", "stop_cluster.sh"):
        text = (SLURM_SCRIPTS / script).read_text()
        assert text.count("CONF=/etc/slurm/slurm.conf\n") == 1, script
        copy = tmp_path / script
        copy.write_text(text.replace("CONF=/etc/slurm/slurm.conf\n", f"CONF={foreign}\n"))
        proc = subprocess.run(["bash", str(copy)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (script, proc.stdout, proc.stderr)
        assert "not written by scripts/slurm/start_cluster.sh" in proc.stderr, proc.stderr
    assert foreign.read_text() == "ClusterName=production\nSlurmctldHost=head01\n"
