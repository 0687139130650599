"""Helpers for the Slurm tests: job environment, a tiny training config, a handle on the test cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM_SCRIPTS = REPO / "scripts" / "slurm"
TRAIN_SBATCH = SLURM_SCRIPTS / "train.sbatch"
#: Directory of the venv's console scripts (cednet-train) and python.
VENV_BIN = Path(sys.executable).parent

#: A tiny, deterministic version of the embedded default training (digits + CEDNet nano): 32 px images, no
#: augmentation, 4 steps per epoch, an odd validation set (351 images) split unevenly over 2 ranks
#: (rank 0: 176 images = batches of 88 + 88, rank 1: 175 = 88 + 87).
TINY_TRAIN = [
    "data.image_size=32",
    "data.augment=false",
    "data.val_fraction=0.195",
    "data.eval_batch_size=88",
    "+trainer.limit_train_batches=4",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "extras.print_config=false",
]


def job_env(tmp_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for cednet-train runs and sbatch submissions: venv first on PATH, logs under tmp_path.

    Slurm variables of an enclosing job are dropped so that local runs never mistake themselves for Slurm tasks.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CEDNET_LOG_DIR"] = str(tmp_path / "logs")
    env["CEDNET_DATA_DIR"] = str(tmp_path / "data")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class SlurmCluster:
    """Handle on the running test cluster: submit, watch and requeue jobs."""

    node: str
    started_here: bool
    jobs: list[str] = field(default_factory=list)

    def sbatch(self, args: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
        """Submit with `sbatch --parsable ARGS` and return the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            cwd=cwd,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"sbatch {' '.join(args)} failed: {proc.stderr}"
        job = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def state(self, job: str) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, FAILED, ...) from `scontrol show job`."""
        proc = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30)
        match = re.search(r"JobState=(\S+)", proc.stdout)
        return match.group(1) if match else "UNKNOWN"

    def field(self, job: str, name: str) -> str:
        """One `Key=Value` field of `scontrol show job` (e.g. ExitCode, Restarts)."""
        proc = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30)
        match = re.search(rf"\b{name}=(\S+)", proc.stdout)
        return match.group(1) if match else ""

    def wait(self, job: str, timeout: float = 240.0, poll: float = 0.5) -> str:
        """Wait until the job has left the queue (polling squeue, faster than `sbatch --wait`); return its state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
            if proc.returncode == 0 and not proc.stdout.strip():
                return self.state(job)
            time.sleep(poll)
        subprocess.run(["scancel", job], check=False)
        raise TimeoutError(f"Slurm job {job} still queued/running after {timeout:.0f} s (cancelled)")

    def wait_for(self, predicate: object, what: str, timeout: float = 240.0, poll: float = 0.25) -> None:
        """Poll `predicate()` until it is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            time.sleep(poll)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    def requeue(self, job: str, restarts: int = 1) -> None:
        """`scontrol requeue JOB` (its `restarts`-th requeue), then release it at once (skips the cred_expire hold)."""
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        self.release_requeued(job, restarts)

    def release_requeued(self, job: str, restarts: int = 1, timeout: float = 120.0) -> None:
        """Once the job has been requeued `restarts` times, let it start now (skips cred_expire + scheduler pass)."""
        self.wait_for(
            lambda: int(self.field(job, "Restarts") or 0) >= restarts, f"job {job} requeued", timeout
        )
        self.wait_for(lambda: self.state(job) != "COMPLETING", f"job {job} requeue completed", timeout)
        if self.state(job) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False, timeout=30)

    def cancel_all(self) -> None:
        """Cancel the jobs this session submitted that are still queued or running."""
        for job in self.jobs:
            if self.state(job) in (
                "PENDING",
                "RUNNING",
                "CONFIGURING",
                "COMPLETING",
                "REQUEUED",
                "SUSPENDED",
            ):
                subprocess.run(["scancel", job], check=False, timeout=30)


class SlurmUnavailable(Exception):
    """The test cluster cannot run on this machine; the message is the reason (from start_cluster.sh)."""


def start_cluster(script: Path = SLURM_SCRIPTS / "start_cluster.sh", timeout: float = 600.0) -> SlurmCluster:
    """Run `start_cluster.sh` (install if needed, start, wait for the node) and return a handle on the cluster.

    Raises:
        SlurmUnavailable: the script exited 2 (not root, no apt-get, no package mirror, not Linux).
        RuntimeError: any other failure of the script.
    """
    if sys.platform != "linux":
        raise SlurmUnavailable(f"the local Slurm test cluster needs Linux (this is {sys.platform})")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 2:
        lines = [line for line in proc.stderr.splitlines() if "cannot start slurm" in line]
        raise SlurmUnavailable(lines[0] if lines else proc.stderr.strip() or f"{script.name} exited 2")
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    first = proc.stdout.splitlines()[0].strip() if proc.stdout.strip() else ""
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    return SlurmCluster(node=node, started_here=first == "started")


def stop_cluster(script: Path = SLURM_SCRIPTS / "stop_cluster.sh") -> None:
    """Stop the daemons by their pid files and forget the test jobs."""
    subprocess.run(["bash", str(script), "--purge"], check=False, timeout=120)
