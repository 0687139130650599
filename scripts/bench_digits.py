"""Benchmark the embedded default: `cednet-train` (no arguments) on the digits, then `cednet-eval` on its checkpoint.

Checks the README claim: >= 95% val top-1 within 5 minutes on 2 CPU cores, reproduced by cednet-eval. Prints the
wall-clock and CPU times, the machine's core count and load (a shared machine inflates wall time).

Usage::

    python scripts/bench_digits.py                      # the default run, in a temporary dir
    python scripts/bench_digits.py --workdir /tmp/bench trainer.max_epochs=8   # extra overrides go to cednet-train

On a shared (oversubscribed) machine, OpenMP's default spin-waiting makes 2-thread CPU training several times
slower; run with `OMP_WAIT_POLICY=PASSIVE` (or `OMP_NUM_THREADS=1`) there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_ACC = 0.95
TARGET_SECONDS = 300.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run a command, logging its output; return (wall seconds, CPU seconds)."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=False)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for cednet-train")
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    train_bin, eval_bin = (
        shutil.which("cednet-train", path=str(bin_dir)),
        shutil.which("cednet-eval", path=str(bin_dir)),
    )
    if not train_bin or not eval_bin:
        sys.exit(f"cednet-train / cednet-eval not found next to {sys.executable}; install the package first")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_digits_"))
    workdir.mkdir(parents=True, exist_ok=True)
    train_dir, eval_dir = workdir / "train", workdir / "eval"
    shutil.rmtree(train_dir, ignore_errors=True)
    shutil.rmtree(eval_dir, ignore_errors=True)

    load0 = os.getloadavg()
    train_cmd = [train_bin, f"hydra.run.dir={train_dir}", "extras.print_config=false", *args.overrides]
    train_wall, train_cpu = _run(train_cmd, workdir, workdir / "train.log")
    load1 = os.getloadavg()
    result = json.loads((train_dir / "metrics.json").read_text())
    last = train_dir / "checkpoints" / "last.ckpt"
    eval_cmd = [eval_bin, f"ckpt={last}", f"hydra.run.dir={eval_dir}", "extras.print_config=false"]
    eval_wall, _ = _run(eval_cmd, workdir, workdir / "eval.log")
    evaluated = json.loads((eval_dir / "metrics.json").read_text())["metrics"]

    acc, acc_ema = result["metrics"]["val/acc1"], result["metrics"].get("val/acc1_ema")
    eval_acc = evaluated["val/acc1"]
    ok_acc, ok_time = acc >= TARGET_ACC, train_wall <= TARGET_SECONDS
    ok_repro = abs(eval_acc - acc) <= 1e-6
    print(
        f"machine: {os.cpu_count()} CPU cores, load average {load0[0]:.1f} before / {load1[0]:.1f} after training"
    )
    print(f"train:  {' '.join(['cednet-train', *train_cmd[1:]])}")
    print(
        f"        wall {train_wall:.1f}s, CPU {train_cpu:.1f}s, {result['epochs']} epochs, {result['global_step']} steps"
    )
    print(
        f"        val/acc1 {acc:.4f}  val/acc1_ema {acc_ema if acc_ema is None else f'{acc_ema:.4f}'}  "
        f"throughput {result['metrics'].get('train/throughput', float('nan')):.0f} img/s"
    )
    print(f"eval:   {' '.join(['cednet-eval', *eval_cmd[1:]])}")
    print(
        f"        wall {eval_wall:.1f}s, val/acc1 {eval_acc:.4f}  (train {acc:.4f}, diff {eval_acc - acc:+.2e})"
    )
    print(
        f"target: val/acc1 >= {TARGET_ACC}: {'OK' if ok_acc else 'FAIL'};  training <= {TARGET_SECONDS:.0f}s: "
        f"{'OK' if ok_time else 'FAIL'};  eval reproduces: {'OK' if ok_repro else 'FAIL'}"
    )
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"runs kept in {workdir}")
    sys.exit(0 if ok_acc and ok_time and ok_repro else 1)


if __name__ == "__main__":
    main()
