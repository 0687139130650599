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


def _assert_epochs_once(runs: dict[int, str], epochs: int, steps_per_epoch: int) -> None:
    """Across all runs of a requeued job, every epoch finished exactly once, in order, at its planned global step."""
    done = [d for restart in sorted(runs) for d in _epochs_done(runs[restart])]
    assert [e for e, _ in done] == list(range(epochs)), f"epochs finished (in order): {done}"
    assert [g for _, g in done] == [steps_per_epoch * (e + 1) for e in range(epochs)], done


def test_sbatch_ddp_two_ranks_matches_single_process(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """2-task gloo DDP under srun (2 x batch 16) vs one process (batch 32): same global batches, same metrics.

    Tolerance: the two runs see identical global batches (the epoch permutation is sharded rank-interleaved, see
    `EpochSeededDistributedSampler`) and DDP averages per-rank mean gradients, so they differ only by float32
    summation order (measured: max |weight difference| 7.6e-7 after 8 AdamW steps; val/acc1, val/acc5, stage and EMA
    accuracies identical; val/loss equal to 7 significant digits). Asserted: accuracies within one validation image
    (1/351; a tie could flip one prediction), val/loss within 1e-4 relative.
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
        joined = re.findall(rf"Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2", log)
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


def test_preemption_signal_and_requeue_resume_without_repeating(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """One job, requeued twice, continues each time from its newest checkpoint and trains every epoch once.

    1. SIGUSR1 in the middle of epoch 1 (what `--signal=SIGUSR1@90` sends before the time limit): Lightning, the
       requeue owner, saves hpc_ckpt_1.ckpt and runs `scontrol requeue`; the rerun resumes from it mid-epoch.
    2. `scontrol requeue` (preemption, admin) during epoch 2 of the rerun: no signal, no hpc checkpoint; the third
       run resumes from checkpoints/last.ckpt (end of epoch 1, newer than hpc_ckpt_1.ckpt).
    Same job id each time, hence the same run dir; runs 0 and 1 are slowed to 1.5 s per batch.
    """
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
            "+callbacks.slow._target_=slurm_callbacks.SlowUntilRestart",
            "+callbacks.slow.seconds=1.5",
            "+callbacks.slow.restarts=2",
        ],
        cwd=tmp_path,
        env=env,
    )
    out = tmp_path / f"slurm-{job}.out"

    def run_log(restart: int) -> str:
        return _segments(out.read_text()).get(restart, "") if out.exists() else ""

    slurm_cluster.wait_for(lambda: "epoch 0 done" in run_log(0), f"job {job} to finish epoch 0", timeout=300)
    time.sleep(2.0)  # about one 1.5 s batch into epoch 1: the signal lands mid-epoch
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    slurm_cluster.release_requeued(job, restarts=1)
    slurm_cluster.wait_for(
        lambda: "epoch 1 done" in run_log(1), f"job {job} rerun to finish epoch 1", timeout=300
    )
    slurm_cluster.requeue(job, restarts=2)
    state = slurm_cluster.wait(job)
    log = out.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log[-4000:]}"
    assert slurm_cluster.field(job, "Restarts") == "2"

    runs = _segments(log)
    assert sorted(runs) == [0, 1, 2], f"runs by restart count: {sorted(runs)}"
    assert "Handling auto-requeue signal" in runs[0] and f"Requeued SLURM job: {job}" in runs[0]
    assert "DUE TO JOB REQUEUE" in runs[1]
    run_dir = tmp_path / "logs" / "train" / "runs" / f"slurm-{job}"
    starts = [_fit_starts(runs[r]) for r in (0, 1, 2)]
    assert starts[0] == [(0, 0, "-")]
    ((epoch, step, ckpt),) = starts[1]
    assert ckpt == str(run_dir / "hpc_ckpt_1.ckpt") and epoch == 1 and 4 <= step < 8, starts[1]
    assert starts[2] == [(2, 8, str(run_dir / "checkpoints" / "last.ckpt"))]
    _assert_epochs_once(runs, epochs=3, steps_per_epoch=4)

    assert _run_dirs(tmp_path) == [run_dir]
    metrics = _metrics(run_dir)
    assert (metrics["global_step"], metrics["epochs"]) == (12, 3)
    assert metrics["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")


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
    assert len(re.findall(r"Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2", logs)) == 2


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
