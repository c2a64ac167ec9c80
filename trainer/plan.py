"""tfdp-plan: parameters, memory, step time and efficiency of a data-parallel
run before it starts, from device presets or from this machine's measured
constants (--calibrate). The cost model and its formulas: tfdp/costmodel.py.

    tfdp-plan --device=h100 --devices_per_worker=8 --num_workers=4 --num_layers=24 \\
      --hidden_dim=1024 --num_heads=16 --intermediate_dim=4096 --seq_len=1024 \\
      --vocab_size=50257 --global_batch_size=512 --mixed_precision=bf16
    tfdp-plan --calibrate --json          # the default job on this machine's CPU
"""

import dataclasses
import json

from absl import flags

from tfdp.config import MIXED_PRECISION
from trainer import cli
from trainer.flags import _D, FLAGS, define_model_flags

define_model_flags()
flags.DEFINE_integer("vocab_size", 257, "Vocabulary size (257: tfdp's byte tokenizer).")
flags.DEFINE_integer("global_batch_size", _D.global_batch_size,
                     "Windows per step over all replicas of all workers.")
flags.DEFINE_enum("mixed_precision", _D.mixed_precision, MIXED_PRECISION,
                  "Compute precision, as tfdp-train's: off (float32), bf16 or fp16.")
flags.DEFINE_integer("grad_accum_steps", _D.grad_accum_steps,
                     "Micro-batches per replica per step (one all-reduce per step).")
flags.DEFINE_integer("num_workers", 1, "Worker processes (nodes) in the job.")
flags.DEFINE_integer("devices_per_worker", 0,
                     "Replicas per worker: GPUs, or logical CPU replicas sharing the cores. "
                     "0: as tfdp-train does on a CPU (2 replicas alone, 1 per worker in a "
                     "multi-worker job); 1 on GPUs.")
flags.DEFINE_string("device", "cpu",
                    "cpu (this machine, measured: implies --calibrate unless "
                    "--device_tflops is given) or a preset: a100, a100-40gb, h100, h200, "
                    "v100, l4.")
flags.DEFINE_float("device_tflops", None,
                   "Peak dense TFLOPS of one device in the compute precision; replaces the "
                   "preset's (or the measured) figure.")
flags.DEFINE_float("device_memory_gib", None,
                   "Memory of one device, GiB; replaces the preset's (cpu: this machine's RAM).")
flags.DEFINE_float("interconnect_gbps", None,
                   "Bandwidth between nodes, Gbit/s one way per node (default 100; "
                   "--calibrate: measured on loopback between two processes).")
flags.DEFINE_float("intra_node_gbps", None,
                   "Bandwidth between the devices of a node (NVLink), Gbit/s one way "
                   "(default: the preset's).")
flags.DEFINE_bool("calibrate", False,
                  "Measure this machine instead of trusting presets: matmul peak, the model's "
                  "own forward/backward rate and its spread, per-step overhead, all-reduce "
                  "bandwidth and latency between replicas; with --num_workers > 1 all of it "
                  "in a 2-worker job on loopback, which also measures how much two busy "
                  "workers slow each other. Takes about a minute.")
flags.DEFINE_integer("cpu_threads_per_worker", 0,
                     "With --calibrate on a CPU: calibrate a worker pinned to this many cores, "
                     "as tfdp-launch --cpu_threads_per_worker runs it (0: all cores).")
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


def main() -> None:
    from tfdp import plan
    from tfdp.costmodel import Job, Shape
    from tfdp.machines import CPU, hardware
    from tfdp.errors import UserError

    device = FLAGS.device
    replicas = FLAGS.devices_per_worker
    if replicas < 0:
        raise UserError(f"--devices_per_worker={replicas} must not be negative (0: the default)")
    if replicas == 0:
        replicas = _D.num_cpu_replicas if device == CPU and FLAGS.num_workers == 1 else 1
    job = Job(Shape(FLAGS.num_layers, FLAGS.num_heads, FLAGS.hidden_dim,
                    FLAGS.intermediate_dim, FLAGS.vocab_size, FLAGS.seq_len),
              FLAGS.global_batch_size, FLAGS.mixed_precision, FLAGS.grad_accum_steps,
              FLAGS.num_workers, replicas)
    plan.validate(job)
    if FLAGS.cpu_threads_per_worker < 0:
        raise UserError(f"--cpu_threads_per_worker={FLAGS.cpu_threads_per_worker} must not "
                        "be negative (0: all cores)")
    calibrate = FLAGS.calibrate or (device == CPU and FLAGS.device_tflops is None)
    # The preset (cpu: a placeholder peak that calibration replaces).
    hw = hardware(device, job.mixed_precision,
                  tflops=FLAGS.device_tflops or (1.0 if calibrate else None),
                  memory_gib=FLAGS.device_memory_gib,
                  intra_node_gbps=FLAGS.intra_node_gbps,
                  interconnect_gbps=FLAGS.interconnect_gbps)
    if calibrate:
        from tfdp.calibrate import calibrate as measure

        say = (lambda *_: None) if FLAGS.json else (lambda m: print(m, flush=True))
        measured = measure(job, device, FLAGS.cpu_threads_per_worker, log=say)
        # Explicit flags win over measurements.
        for flag, field in (("device_tflops", "peak_flops"),
                            ("device_memory_gib", "memory_bytes"),
                            ("intra_node_gbps", "intra_bandwidth"),
                            ("interconnect_gbps", "inter_bandwidth")):
            if FLAGS[flag].value is not None:
                measured.pop(field, None)
        hw = dataclasses.replace(hw, **measured)
    figures = plan.plan(job, hw)
    if FLAGS.json:
        print(json.dumps({**figures, "job": dataclasses.asdict(job)}, indent=2))
    else:
        print(plan.format_plan(job, figures))


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
