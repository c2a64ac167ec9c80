#!/usr/bin/env python3
"""tfdp-plan's predictions against real tfdp-train runs on this machine.

For each case, `tfdp-plan --calibrate --json` predicts (calibrating on this
machine as the case's workers will run), then `tfdp-train` trains the
default model (4 layers, width 128, byte vocabulary, context 128) on the
stdlib corpus for `--steps` steps, and so does the case's reference,
alternating for `--rounds` rounds; metrics.json gives each run's mean
step time (the first, compiling call left out; the median over rounds is
taken) and the chief's peak resident memory (peak_host_memory_gib, the
largest). Cases:

  1 worker   tfdp-train's default: MirroredStrategy over the CPU split
             into 2 logical replicas sharing both cores
             (tfdp-plan --devices_per_worker=2). Measured efficiency:
             tokens/s / tokens/s of one replica (--strategy=one_device)
             training the same global batch on the same cores, i.e. the
             share of the step the second replica's all-reduce and
             replication do not cost.
  2 workers  tfdp-launch --num_workers=2 --cpu_threads_per_worker=1
             (MultiWorkerMirrored over loopback, a core each;
             tfdp-plan --num_workers=2 --cpu_threads_per_worker=1).
             Measured efficiency as benchmarks/weak_scaling.py: tokens/s
             / (2 x tokens/s of 1 process pinned to one core at the same
             per-replica batch).

    python benchmarks/plan_vs_measured.py            # ~20 minutes on 2 idle cores
    python benchmarks/plan_vs_measured.py --steps 20 --cases 1w:8,2w:12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_CASES = "1w:8,1w:32,2w:12,2w:64"  # kind:global batch (windows of 128)


def _run(cmd: list[str], env: dict | None = None, timeout: float = 900) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def predict(kind: str, batch: int) -> dict:
    flags = ["--device=cpu", "--calibrate", "--json", f"--global_batch_size={batch}"]
    if kind == "2w":
        flags += ["--num_workers=2", "--cpu_threads_per_worker=1"]
    else:
        flags += ["--devices_per_worker=2"]
    return json.loads(_run([str(BIN / "tfdp-plan"), *flags]))


def train(data: str, batch: int, steps: int, how: str, tmp: str) -> dict:
    """metrics.json of a tfdp-train run: how = mirrored (2 CPU replicas),
    one_device (all cores), pair (2 workers, a core each) or single (one core)."""
    model_dir = tempfile.mkdtemp(dir=tmp)
    flags = [f"--data={data}", f"--model_dir={model_dir}", f"--global_batch_size={batch}",
             f"--train_steps={steps}", f"--eval_every={steps}", "--eval_steps=1",
             f"--checkpoint_every={steps}", f"--log_every={steps}", "--sample_tokens=0"]
    train_cmd = [str(BIN / "tfdp-train"), *flags]
    env = {"TF_CPP_MIN_LOG_LEVEL": "3"}
    if how == "pair":
        _run([str(BIN / "tfdp-launch"), "--num_workers=2", "--cpu_threads_per_worker=1", "--",
              *train_cmd], env)
    elif how == "single":
        env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
        core = str(sorted(os.sched_getaffinity(0))[0])
        _run(["taskset", "-c", core, *train_cmd, "--strategy=one_device"], env)
    else:
        strategy = "mirrored" if how == "mirrored" else "one_device"
        _run([*train_cmd, f"--strategy={strategy}"], env)
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating runs of each case and its reference (medians)")
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help="comma-separated KIND:GLOBAL_BATCH, KIND 1w or 2w")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tfdp import recipes
    from tfdp.prepare import prepare

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        prepare(recipes.source_files("stdlib"), data_dir, "byte", log=lambda *_: None)
        print(f"plan vs measured on {os.cpu_count()} cores, default model, {args.steps} "
              "steps per run", flush=True)
        for case in args.cases.split(","):
            kind, batch = case.split(":")
            batch = int(batch)
            p = predict(kind, batch)
            # The job and its one-replica reference in alternating rounds;
            # medians, so that a drift of the machine falls on both alike.
            how, ref_how, ref_batch = (("pair", "single", batch // 2) if kind == "2w"
                                       else ("mirrored", "one_device", batch))
            runs, refs = [], []
            for _ in range(args.rounds):
                runs.append(train(data_dir, batch, args.steps, how, tmp))
                refs.append(train(data_dir, ref_batch, args.steps, ref_how, tmp))
            run = {"step_time": statistics.median(r["step_time"] for r in runs),
                   "peak_host_memory_gib": max(r["peak_host_memory_gib"] for r in runs)}
            ref_step = statistics.median(r["step_time"] for r in refs)
            # 2w: tokens/s over 2 x tokens/s of one worker alone at the same
            # per-replica batch; 1w: tokens/s over one replica's on the same
            # cores at the same global batch. Both are the step-time ratio.
            measured_eff = ref_step / run["step_time"]
            row = {"case": "2 workers, 1 core each" if kind == "2w" else "1 worker, 2 CPU replicas",
                   "global_batch": batch, "tokens_per_replica": batch // 2 * 128,
                   "predicted_step_s": p["step_time_s"], "measured_step_s": run["step_time"],
                   "predicted_efficiency": p["efficiency"], "measured_efficiency": measured_eff,
                   "predicted_memory_gib": p["memory_per_device_gib"],
                   "measured_memory_gib": run["peak_host_memory_gib"],
                   "compute_s": p["compute_time_s"], "allreduce_s": p["allreduce_time_s"],
                   "fixed_s": p["fixed_time_s"], "wait_s": p["wait_time_s"],
                   "contention": p["contention"], "step_cv": p["step_time_cv"],
                   "compute_efficiency": p["compute_efficiency"],
                   "load_average": os.getloadavg()[0]}  # others' work on the same cores
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| case | global batch | step predicted | measured | ratio | efficiency predicted "
          "| measured | memory predicted | measured | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['global_batch']} ({r['tokens_per_replica']} tok/replica) | "
              f"{1e3 * r['predicted_step_s']:.1f} ms | {1e3 * r['measured_step_s']:.1f} ms | "
              f"{r['predicted_step_s'] / r['measured_step_s']:.2f} | "
              f"{r['predicted_efficiency']:.1%} | {r['measured_efficiency']:.1%} | "
              f"{r['predicted_memory_gib']:.2f} GiB | {r['measured_memory_gib']:.2f} GiB | "
              f"{r['load_average']:.1f} |")


if __name__ == "__main__":
    main()
