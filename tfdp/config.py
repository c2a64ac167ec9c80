"""The frozen configurations: Config for a training run, FinetuneConfig for
a fine-tune.

trainer/ turns absl flags into a `Config`; everything below takes the config
(or plain arguments) and never reads flags. `validate()` rejects bad values
before anything is built or written, naming the flag and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from tfdp.errors import UserError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored")
TOKENIZERS = ("byte", "char", "wordpiece", "sentencepiece", "bpe")
# The vocabulary a tokenizer gets without --vocab_size (byte and char are fixed).
DEFAULT_VOCAB_SIZE = {"byte": 257, "char": 256, "wordpiece": 8192, "sentencepiece": 8192,
                      "bpe": 8192}
SAMPLERS = ("greedy", "beam", "top_k", "top_p")
INPUT_SHARDING = ("auto", "interleave")
ALL_REDUCE_DTYPES = ("float32", "bfloat16")
MIXED_PRECISION = ("off", "bf16", "fp16")
FINETUNE_TASKS = ("classification", "completion")  # tfdp-finetune --task (tfdp/tasks/)
POOLINGS = ("last", "mean")  # what a classifier's head reads (tfdp/tasks/classification.py)
COLLECTIVES = ("auto", "nccl", "ring")  # tfdp/strategy.py: choose_collective
# Exit codes tfdp uses for other outcomes, which a preemption must not take:
# 1 (a bug: Python's traceback), 2 (a user's mistake), 3 (a lost peer),
# 130 (Ctrl-C), 137 (the join watchdog's kill: a worker that never arrived).
RESERVED_EXIT_CODES = (0, 1, 2, 3, 130, 137)

# Fields that fix the model's shape, the meaning of its tokens, or the data
# order (a pure function of seed, step and global batch). A model_dir written
# with other values cannot be resumed (see `check_resumable`).
RESUME_FIELDS = (
    "data", "text_feature", "tokenizer", "vocab_size", "val_fraction", "seq_len",
    "num_layers", "num_heads", "hidden_dim", "intermediate_dim",
    "global_batch_size", "seed",
)


def check_batch(global_batch_size: int, replicas: int, grad_accum_steps: int = 1,
                flag: str = "--global_batch_size") -> None:
    """The global batch must split evenly over the replicas (and each
    replica's share into the gradient-accumulation micro-batches)."""
    if global_batch_size % replicas:
        raise UserError(f"{flag}={global_batch_size} is not divisible by the "
                        f"{replicas} replicas; use a multiple of {replicas}")
    if global_batch_size % (replicas * grad_accum_steps):
        unit = replicas * grad_accum_steps
        raise UserError(f"{flag}={global_batch_size} does not split into "
                        f"--grad_accum_steps={grad_accum_steps} micro-batches on each of the "
                        f"{replicas} replicas; use a multiple of {unit}")


def default_model_dir() -> str:
    """`$XDG_CACHE_HOME/tfdp/runs/default` (or ~/.cache/...)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(cache, "tfdp", "runs", "default")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs; defaults are the README's main job.

    The default job (a 0.8M-parameter byte-level GPT on the interpreter's
    standard library) is sized to finish in about five minutes on a 2-core
    CPU split into two replicas.
    """

    # Data: a prepared directory, a text file/glob/directory list, "stdlib",
    # or a TensorFlow Datasets split "tfds:NAME[/CONFIG][:SPLIT]" (streamed).
    data: str = "stdlib"
    text_feature: str = "text"  # the TFDS feature that holds the text
    tfds_data_dir: str | None = None  # None: TFDS' default (~/tensorflow_datasets)
    tfds_download: bool = False  # let TFDS download and prepare a dataset it lacks
    tokenizer: str = "byte"
    vocab_size: int | None = None  # None: the tokenizer's own default
    val_fraction: float = 0.02
    seq_len: int = 128
    # Model (GPT-2 architecture from keras-hub, tied embeddings).
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 512
    dropout: float = 0.0
    # Optimisation: AdamW, linear warmup then cosine decay.
    global_batch_size: int = 32
    grad_accum_steps: int = 1  # micro-batches per replica per step (one all-reduce, one update)
    train_steps: int = 1000
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99
    clip_norm: float = 1.0
    # Loop: validation, checkpoints, logging.
    eval_every: int = 250
    eval_steps: int = 0  # 0: the whole validation split
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    # Fault tolerance (docs/checkpoints.md).
    skip_nonfinite_steps: int = 0  # updates with NaN/Inf loss or gradients to skip before stopping
    preemption_grace_seconds: float = 25.0  # SIGTERM -> checkpoint -> exit within this
    # The status after that checkpoint: 75 (EX_TEMPFAIL) by default; a
    # scheduler that retries only some codes gets one it retries (Kubeflow's
    # ExitCode policy: 138, deploy/k8s/tfjob.yaml).
    preempted_exit_code: int = 75
    overwrite: bool = False  # discard an incompatible run in model_dir instead of refusing
    log_every: int = 50
    steps_per_loop: int = 1  # steps per tf.function call (no Python between them)
    # What the chief writes besides checkpoints and metrics: report.html at
    # the end, and the model's graph in TensorBoard on a run's first start
    # (seconds each; a large model's GraphDef is large).
    report: bool = True
    tensorboard_graph: bool = True
    seed: int = 1234
    sample_tokens: int = 300
    sample_prompt: str | None = None  # None: lines of held-out validation text
    # System.
    strategy: str = "auto"
    num_cpu_replicas: int = 2
    # How replicas all-reduce: auto is NCCL where the worker has GPUs (and
    # the gradients are not bfloat16), else RING (tfdp/strategy.py).
    collective: str = "auto"
    # NVIDIA GPUs present but none registered by TensorFlow (missing CUDA or
    # cuDNN libraries) is an error unless this says the CPU will do.
    allow_cpu: bool = False
    jit_compile: bool | None = None  # None: tfdp.step.default_jit_compile decides
    # bf16/fp16: 16-bit compute; float32 weights, loss and softmax; fp16 with
    # a dynamic loss scale (tfdp/loss_scale.py).
    mixed_precision: str = "off"
    # Multi-worker: how long a dead, frozen or missing worker may hold up the
    # others (tfdp/watchdog.py), and the first port of each SLURM node's tasks.
    collective_timeout: float = 600.0
    input_sharding: str = "auto"  # whole shard files per worker when possible
    all_reduce_dtype: str = "float32"  # bfloat16 halves the bytes (benchmarks/weak_scaling.py)
    slurm_port_base: int = 8888
    model_dir: str = dataclasses.field(default_factory=default_model_dir)
    # A keras-hub GPT-2 preset directory whose weights start a fresh run; it
    # fixes the model's shape and tokenizer (tfdp/presets.py). Not a resume
    # field: a resumed run continues from its checkpoint, not the preset.
    init_from: str | None = None

    def validate(self) -> "Config":
        """Raise UserError for the first bad value; return self when all are fine."""
        positive = ("seq_len", "num_layers", "num_heads", "hidden_dim",
                    "intermediate_dim", "global_batch_size", "grad_accum_steps", "train_steps",
                    "eval_every", "checkpoint_every", "keep_checkpoints",
                    "log_every", "num_cpu_replicas", "steps_per_loop")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name}={getattr(self, name)} must be a positive "
                                "integer; pass a value >= 1")
        non_negative = ("eval_steps", "warmup_steps", "weight_decay", "clip_norm",
                        "min_learning_rate", "sample_tokens", "skip_nonfinite_steps")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"--{name}={getattr(self, name)} must not be negative")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise UserError(f"--vocab_size={self.vocab_size} must be a positive integer "
                            "(or omitted for the tokenizer's default)")
        for name, choices in (("strategy", STRATEGIES), ("tokenizer", TOKENIZERS),
                              ("input_sharding", INPUT_SHARDING),
                              ("all_reduce_dtype", ALL_REDUCE_DTYPES),
                              ("mixed_precision", MIXED_PRECISION),
                              ("collective", COLLECTIVES)):
            if getattr(self, name) not in choices:
                raise UserError(f"--{name}={getattr(self, name)!r} is unknown; "
                                f"use one of {', '.join(choices)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val_fraction={self.val_fraction} must be between 0 and 1 "
                            "(exclusive), e.g. 0.02")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout={self.dropout} must be in [0, 1)")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate={self.learning_rate} must be positive")
        if self.min_learning_rate > self.learning_rate:
            raise UserError(f"--min_learning_rate={self.min_learning_rate} exceeds "
                            f"--learning_rate={self.learning_rate}; lower it")
        if not 0.0 < self.beta2 < 1.0:
            raise UserError(f"--beta2={self.beta2} must be between 0 and 1, e.g. 0.99")
        if self.hidden_dim % self.num_heads:
            raise UserError(f"--hidden_dim={self.hidden_dim} is not divisible by "
                            f"--num_heads={self.num_heads}; pick values that divide")
        if self.collective_timeout <= 0:
            raise UserError(f"--collective_timeout={self.collective_timeout} must be a positive "
                            "number of seconds, e.g. 600")
        if self.preemption_grace_seconds <= 0:
            raise UserError(f"--preemption_grace_seconds={self.preemption_grace_seconds} must be "
                            "a positive number of seconds, a little below the scheduler's own "
                            "grace period (30 s by default on Kubernetes and SLURM)")
        if not 0 <= self.preempted_exit_code < 256 or \
                self.preempted_exit_code in RESERVED_EXIT_CODES:
            raise UserError(f"--preempted_exit_code={self.preempted_exit_code} must be an exit "
                            "status from 4 to 255 other than 130 and 137 (tfdp's codes for "
                            "success, a bug, a bad input, a lost worker, Ctrl-C and a worker "
                            "that never joined); 75 by default, 138 for Kubeflow's ExitCode "
                            "policy")
        if not 1024 <= self.slurm_port_base <= 65000:
            raise UserError(f"--slurm_port_base={self.slurm_port_base} must be a port between "
                            "1024 and 65000")
        if not self.model_dir:
            raise UserError("--model_dir is empty; give a directory for checkpoints and logs")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """Build from a saved config, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def load(cls, model_dir: str) -> "Config | None":
        """The config a run saved in `model_dir`, or None if there is none."""
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise TypeError("not a JSON object")
            return cls.from_dict(values)
        except (ValueError, TypeError) as err:
            raise UserError(f"{path} is unreadable ({err}); point --model_dir at an intact "
                            "tfdp-train run or use a new one") from None

    def resume_conflicts(self, saved: "Config") -> str | None:
        """Why a run saved with `saved` cannot be continued by this config
        (its model or data differ), or None when it can."""
        # Runs saved before config.json held resolved values kept None for the
        # tokenizer's default vocabulary: the same thing as that size.
        if saved.vocab_size is None and self.vocab_size is not None:
            saved = dataclasses.replace(saved,
                                        vocab_size=DEFAULT_VOCAB_SIZE.get(saved.tokenizer))
        diffs = [f"--{name}={getattr(saved, name)!r} (now {getattr(self, name)!r})"
                 for name in RESUME_FIELDS
                 if getattr(saved, name) != getattr(self, name)]
        return f"holds a run with {', '.join(diffs)}" if diffs else None


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning job; trainer/finetune.py fills it from flags."""

    model_dir: str | None  # the tfdp run to start from, or None with init_from
    train: str
    eval: str
    output_dir: str
    init_from: str | None = None  # or a keras-hub GPT-2 preset directory
    task: str = "classification"
    # completion: Python format strings over each example's fields
    # (tfdp/completiondata.py); the defaults read TRL's prompt-completion JSONL.
    prompt_template: str = "{prompt}"
    completion_template: str = "{completion}"
    pack: bool = True  # completion: several examples per window (exactly isolated)
    # completion: each evaluation decodes this many eval examples and scores
    # the text (tfdp/textmetrics.py); 0: loss only.
    score_examples: int = 64
    max_new_tokens: int = 32
    sampler: str = "greedy"  # or beam
    num_beams: int = 4
    text_column: str = "text"
    label_column: str = "label"
    pooling: str = "last"
    seq_len: int = 0  # 0: the longest example (+ EOT), at most the model's seq_len
    global_batch_size: int = 32
    epochs: float = 3.0
    train_steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 250  # and at the end
    keep_checkpoints: int = 3
    log_every: int = 50
    steps_per_loop: int = 1
    report: bool = True  # as tfdp-train's
    tensorboard_graph: bool = True
    seed: int = 1234
    strategy: str = "auto"
    num_cpu_replicas: int = 2
    collective: str = "auto"  # as tfdp-train's (tfdp/strategy.py)
    allow_cpu: bool = False
    jit_compile: bool | None = None
    preemption_grace_seconds: float = 25.0
    preempted_exit_code: int = 75
    tfds_data_dir: str | None = None
    tfds_download: bool = False

    def validate(self) -> "FinetuneConfig":
        if bool(self.model_dir) == bool(self.init_from):
            raise UserError("give one starting point: --model_dir=RUN (a tfdp-train run) or "
                            "--init_from=PRESET (a keras-hub GPT-2 preset directory)")
        if self.task not in FINETUNE_TASKS:
            raise UserError(f"--task={self.task!r} is unknown; use one of "
                            f"{', '.join(FINETUNE_TASKS)}")
        if self.task == "completion":  # malformed templates fail before TensorFlow loads
            from tfdp.completiondata import template_fields
            template_fields(self.prompt_template, "--prompt_template")
            template_fields(self.completion_template, "--completion_template")
            if self.sampler not in ("greedy", "beam"):
                raise UserError(f"--sampler={self.sampler!r} is unknown for scoring; use "
                                "greedy or beam")
            for name in ("max_new_tokens", "num_beams"):
                if getattr(self, name) <= 0:
                    raise UserError(f"--{name}={getattr(self, name)} must be a positive "
                                    "integer")
        if self.pooling not in POOLINGS:
            raise UserError(f"--pooling={self.pooling!r} is unknown; use one of "
                            f"{', '.join(POOLINGS)}")
        for name in ("global_batch_size", "num_cpu_replicas", "checkpoint_every",
                     "keep_checkpoints", "log_every", "steps_per_loop"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name}={getattr(self, name)} must be a positive integer")
        for name in ("seq_len", "train_steps", "eval_every", "weight_decay", "clip_norm",
                     "score_examples"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name}={getattr(self, name)} must not be negative")
        if self.learning_rate <= 0 or (self.train_steps == 0 and self.epochs <= 0):
            raise UserError("--learning_rate and --epochs (or --train_steps) must be positive")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise UserError(f"--warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        # The loop's own checks (exit code, grace) are tfdp-train's.
        Config(preemption_grace_seconds=self.preemption_grace_seconds,
               preempted_exit_code=self.preempted_exit_code).validate()
        return self
