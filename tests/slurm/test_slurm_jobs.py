"""`cednet-train` on a real one-node Slurm cluster: DDP over srun, requeue/preemption, submitit, bad layouts.

All jobs train the embedded default (digits + CEDNet nano) on CPU with gloo, cut down by `TINY_TRAIN`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_helpers import TINY_TRAIN, TRAIN_SBATCH, SlurmCluster, job_env

pytestmark = pytest.mark.slurm

#: sbatch options of a 2-task CPU job on the test node (train.sbatch's defaults ask for 8 GPUs and 8 CPUs/task).
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
#: Validation set size with data.val_fraction=0.195 (odd: 176 + 175 images on 2 ranks).
N_VAL = 351


def _run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "logs" / "train" / "runs").iterdir())


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _segments(log: str) -> dict[int, str]:
    """Split a job log written with --open-mode=append into its runs, keyed by SLURM_RESTART_COUNT."""
    parts = re.split(r"^\[train\.sbatch\] job \d+ restart (\d+):.*$", log, flags=re.M)
    return {int(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}


def _fit_starts(text: str) -> list[tuple[int, int, str]]:
    return [
        (int(e), int(g), c)
        for e, g, c in re.findall(r"fit start: epoch (\d+) global_step (\d+) .* ckpt (\S+)", text)
    ]


def _epochs_done(text: str) -> list[tuple[int, int]]:
    return [(int(e), int(g)) for e, g in re.findall(r"epoch (\d+) done: global_step (\d+)", text)]


def _assert_continued(log: str, epochs: int, steps_per_epoch: int) -> tuple[str, str]:
    """Both runs of a requeued job: the second starts where the first's last checkpoint left off, and every epoch
    finishes exactly once with the planned global step. Returns (first run, second run) log text."""
    runs = _segments(log)
    assert sorted(runs) == [0, 1], f"expected one first run and one requeued run, got restarts {sorted(runs)}"
    first, second = runs[0], runs[1]
    assert _fit_starts(first)[0][:2] == (0, 0)
    done_first = _epochs_done(first)
    assert done_first, "the first run finished no epoch before the requeue"
    resumed = _fit_starts(second)
    assert len(resumed) == 1, resumed
    done = done_first + _epochs_done(second)
    assert [e for e, _ in done] == list(range(epochs)), f"epochs finished (in order): {done}"
    assert [g for _, g in done] == [steps_per_epoch * (e + 1) for e in range(epochs)], done
    return first, second


def test_sbatch_ddp_two_ranks_matches_single_process(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """2-task gloo DDP under srun (2 x batch 16) vs one process (batch 32): same global batches, same metrics.

    Tolerance: the two runs see identical global batches (the epoch permutation is sharded rank-interleaved, see
    `EpochSeededDistributedSampler`) and DDP averages per-rank mean gradients, so they differ only by float32
    summation order (measured: max |weight difference| 7e-7 after 8 AdamW steps, identical val/acc1, val/acc5 and
    EMA accuracies, val/loss within 2e-6). Asserted: accuracies within one validation image (1/351), val/loss within
    1e-4 relative.
    """
    env = job_env(tmp_path)
    common = [*TINY_TRAIN, "trainer.max_epochs=2"]
    job = slurm_cluster.sbatch(
        [
            *CPU_JOB,
            f"--output={tmp_path}/slurm-%j.out",
            str(TRAIN_SBATCH),
            "trainer=ddp_cpu",
            "data.batch_size=16",
            *common,
        ],
        cwd=tmp_path,
        env=env,
    )
    single_dir = tmp_path / "single"
    single = subprocess.run(
        ["cednet-train", "data.batch_size=32", *common, f"hydra.run.dir={single_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    state = slurm_cluster.wait(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log[-4000:]}"
    assert slurm_cluster.field(job, "ExitCode") == "0:0"

    # one process group of 2: each rank logs its join line once
    for rank in (0, 1):
        joined = re.findall(rf"rank {rank}/2 joined the process group \(backend gloo", log)
        assert len(joined) == 1, f"rank {rank}: {joined}\n{log[-3000:]}"
    assert "fit start: epoch 0 global_step 0 world_size 2" in log

    # outputs written once, by rank zero, into the job's stable run dir
    logs = tmp_path / "logs"
    run_dirs = _run_dirs(tmp_path)
    assert [d.name for d in run_dirs] == [f"slurm-{job}"]
    assert len(list(logs.rglob("metrics.json"))) == 1
    assert [p.relative_to(logs) for p in logs.rglob("checkpoints")] == [
        Path(f"train/runs/slurm-{job}/checkpoints")
    ]
    assert len(list(logs.rglob(".hydra"))) == 1
    assert not list(logs.rglob("*ddp_process*")) and not list(logs.rglob("hpc_ckpt_*"))
    ddp = _metrics(run_dirs[0])
    ref = _metrics(single_dir)
    assert ddp["global_step"] == ref["global_step"] == 8
    assert ddp["epochs"] == 2

    d, r = ddp["metrics"], ref["metrics"]
    for key in ("val/acc1", "val/acc5", "val/acc1_ema", "val/acc1_stage0", "train/acc1"):
        assert d[key] == pytest.approx(r[key], abs=1.0 / N_VAL + 1e-7), key
    assert d["val/loss"] == pytest.approx(r["val/loss"], rel=1e-4)
    # every validation image counted once: acc1 = correct / 351 (a padded sampler would divide by 352)
    assert d["val/acc1"] * N_VAL == pytest.approx(round(d["val/acc1"] * N_VAL), abs=1e-3)


def _requeue_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> tuple[str, Path, dict[str, str]]:
    """Submit a 3-epoch job whose first run is slowed down (1.5 s per batch); wait until epoch 0 is saved."""
    env = job_env(tmp_path, {"PYTHONPATH": str(Path(__file__).parent)})
    job = slurm_cluster.sbatch(
        [
            *CPU_JOB,
            f"--output={tmp_path}/slurm-%j.out",
            str(TRAIN_SBATCH),
            "trainer=ddp_cpu",
            "data.batch_size=16",
            *TINY_TRAIN,
            "trainer.max_epochs=3",
            "+callbacks.slow._target_=slurm_callbacks.SlowFirstRun",
            "+callbacks.slow.seconds=1.5",
        ],
        cwd=tmp_path,
        env=env,
    )
    out = tmp_path / f"slurm-{job}.out"
    slurm_cluster.wait_for(
        lambda: out.exists() and "epoch 0 done" in out.read_text(),
        f"job {job} to finish epoch 0",
        timeout=300,
    )
    return job, out, env


def test_scontrol_requeue_resumes_from_last_checkpoint(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`scontrol requeue` of a running job: the rerun (same job id, same run dir) continues from last.ckpt."""
    job, out, _ = _requeue_job(slurm_cluster, tmp_path)
    slurm_cluster.requeue(job)
    state = slurm_cluster.wait(job)
    log = out.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log[-4000:]}"
    assert slurm_cluster.field(job, "Restarts") == "1"
    assert "DUE TO JOB REQUEUE" in log

    first, second = _assert_continued(log, epochs=3, steps_per_epoch=4)
    run_dir = tmp_path / "logs" / "train" / "runs" / f"slurm-{job}"
    epoch, step, ckpt = _fit_starts(second)[0]
    assert ckpt == str(run_dir / "checkpoints" / "last.ckpt")
    assert (epoch, step) == (_epochs_done(first)[-1][0] + 1, _epochs_done(first)[-1][1])
    assert _run_dirs(tmp_path) == [run_dir]
    metrics = _metrics(run_dir)
    assert (metrics["global_step"], metrics["epochs"]) == (12, 3)
    assert metrics["resumed_from"] == ckpt


def test_usr1_preemption_saves_hpc_checkpoint_and_requeues(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The time-limit/preemption signal (SIGUSR1, as `--signal=SIGUSR1@90` sends it) makes Lightning, the requeue
    owner, save hpc_ckpt_1.ckpt mid-epoch and requeue the job; the rerun resumes from it and no step is repeated."""
    job, out, _ = _requeue_job(slurm_cluster, tmp_path)
    time.sleep(2.0)  # about one 1.5 s batch into epoch 1: the signal lands mid-epoch
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    slurm_cluster.release_requeued(job)
    state = slurm_cluster.wait(job)
    log = out.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log[-4000:]}"
    assert "Handling auto-requeue signal" in log and f"Requeued SLURM job: {job}" in log

    _, second = _assert_continued(log, epochs=3, steps_per_epoch=4)
    run_dir = tmp_path / "logs" / "train" / "runs" / f"slurm-{job}"
    assert _fit_starts(second)[0][2] == str(run_dir / "hpc_ckpt_1.ckpt")
    assert _run_dirs(tmp_path) == [run_dir]
    metrics = _metrics(run_dir)
    assert (metrics["global_step"], metrics["epochs"]) == (12, 3)


def test_submitit_launcher_one_job_per_run(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`cednet-train -m hydra/launcher=slurm ... seed=1,2` submits one 2-task job per run, each trains and writes
    its outputs into its own sweep subdir."""
    env = job_env(tmp_path)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            "cednet-train",
            "-m",
            "hydra/launcher=slurm",
            "trainer=ddp_cpu",
            "data.batch_size=16",
            *TINY_TRAIN,
            "trainer.max_epochs=1",
            "hydra.launcher.timeout_min=10",
            "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={sweep}",
            "seed=1,2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    scripts = list((sweep / ".submitit").rglob("*_submission.sh"))
    assert len(scripts) == 1, scripts
    sbatch = scripts[0].read_text()
    for line in (
        "--array=0-1%2",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--signal=USR1@90",
        "--requeue",
        "--open-mode=append",
    ):
        assert f"#SBATCH {line}" in sbatch, (line, sbatch)
    assert "--gpus-per-node" not in sbatch
    for num in (0, 1):
        metrics = _metrics(sweep / str(num))
        assert metrics["global_step"] == 4
        assert (sweep / str(num) / "checkpoints" / "last.ckpt").is_file()
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert len(re.findall(r"rank 1/2 joined the process group", logs)) == 2


def test_mismatched_layouts_fail_fast_with_clear_errors(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Slurm tasks vs trainer.devices mismatch, and a multi-task job without srun: clear error, no hang."""
    env = job_env(tmp_path)
    mismatch = slurm_cluster.sbatch(
        [
            *CPU_JOB,
            "--time=3",
            f"--output={tmp_path}/mismatch-%j.out",
            str(TRAIN_SBATCH),
            "trainer=ddp_cpu",
            *TINY_TRAIN,
            "trainer.devices=3",
        ],
        cwd=tmp_path,
        env=env,
    )
    no_srun = slurm_cluster.sbatch(
        [
            "--ntasks-per-node=2",
            "--time=3",
            f"--output={tmp_path}/nosrun-%j.out",
            "--wrap",
            "cednet-train trainer=ddp_cpu " + " ".join(TINY_TRAIN),
        ],
        cwd=tmp_path,
        env=env,
    )
    for job in (mismatch, no_srun):
        assert slurm_cluster.wait(job, timeout=300) == "FAILED"
    text = (tmp_path / f"mismatch-{mismatch}.out").read_text()
    assert (
        "runs 2 task(s) per node" in text and "trainer.devices=3" in text and "--ntasks-per-node" in text
    ), text
    assert "Initializing distributed" not in text
    text = (tmp_path / f"nosrun-{no_srun}.out").read_text()
    assert "not by srun" in text and "srun cednet-train" in text, text
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("checkpoints"))
