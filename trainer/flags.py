"""Flag definitions shared by the entry points; defaults come from Config."""

from __future__ import annotations

import dataclasses

from absl import flags

from tfdp.config import (ALL_REDUCE_DTYPES, COLLECTIVES, INPUT_SHARDING, MIXED_PRECISION,
                         STRATEGIES, TOKENIZERS, Config)

FLAGS = flags.FLAGS
_D = Config()


def define_data_flags() -> None:
    """Flags that say how text becomes tokens (tfdp-prepare and tfdp-train)."""
    flags.DEFINE_enum("tokenizer", _D.tokenizer, TOKENIZERS,
                      "Tokenizer to train on the text. A prepared --data directory brings "
                      "its own, which is used whatever this says.")
    flags.DEFINE_integer("vocab_size", _D.vocab_size,
                         "Vocabulary size; default: byte 257, char 256, wordpiece, "
                         "sentencepiece and bpe 8192.")
    flags.DEFINE_float("val_fraction", _D.val_fraction,
                       "Fraction of the text, taken from its end, held out for validation.")


def define_tfds_flags() -> None:
    """How `--data=tfds:NAME[/CONFIG][:SPLIT]` is read (tfdp-train, tfdp-eval)."""
    flags.DEFINE_string("text_feature", _D.text_feature,
                        "With --data=tfds:...: the dataset's feature that holds the text.")
    flags.DEFINE_string("tfds_data_dir", _D.tfds_data_dir,
                        "With --data=tfds:...: the TFDS data directory to read "
                        "(default: TFDS' own, ~/tensorflow_datasets).")
    flags.DEFINE_bool("tfds_download", _D.tfds_download,
                      "With --data=tfds:...: let TFDS download and prepare a dataset missing "
                      "from the data directory (otherwise nothing is downloaded).")


def define_cluster_flags() -> None:
    """How a multi-worker job waits for and finds its workers (tfdp-train,
    tfdp-preflight)."""
    flags.DEFINE_float("collective_timeout", _D.collective_timeout,
                       "Multi-worker: seconds a dead, frozen or missing worker may hold up the "
                       "others before they all stop with an error naming it.")
    flags.DEFINE_integer("slurm_port_base", _D.slurm_port_base,
                         "Multi-worker under SLURM: port of the first task on each node "
                         "(the next tasks take the following ports).")


def define_strategy_flags() -> None:
    """Which devices and replicas a command runs on (tfdp-train, tfdp-eval)."""
    flags.DEFINE_enum("strategy", _D.strategy, STRATEGIES,
                      "auto: multi-worker if TF_CONFIG names a cluster, else mirrored over all "
                      "GPUs, else over --num_cpu_replicas logical CPUs.")
    flags.DEFINE_integer("num_cpu_replicas", _D.num_cpu_replicas,
                         "Replicas when training on CPU (the CPU is split into logical devices).")
    flags.DEFINE_enum("collective", _D.collective, COLLECTIVES,
                      "How replicas sum gradients. auto: NCCL where this worker has GPUs "
                      "(and the gradients are not sent as bfloat16, which TensorFlow's NCCL "
                      "ops do not take), otherwise RING (TensorFlow's collective ops: gRPC "
                      "between workers, device copies within one); nccl: NCCL (GPUs only); "
                      "ring: never NCCL. The log names the one that runs.")
    flags.DEFINE_bool("allow_cpu", _D.allow_cpu,
                      "Go on on the CPU when this machine has NVIDIA GPUs (device files, "
                      "NVIDIA_VISIBLE_DEVICES or CUDA_VISIBLE_DEVICES) but TensorFlow "
                      "registers none; without it that is an error naming the likely cause.")


def define_loop_flags() -> None:
    """How the Runner's loop checkpoints, logs and stops (tfdp-train, tfdp-finetune)."""
    flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every,
                         "Save a checkpoint every this many steps (and at the end).")
    flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Checkpoints to keep.")
    flags.DEFINE_float("preemption_grace_seconds", _D.preemption_grace_seconds,
                       "After SIGTERM: finish the step, checkpoint and exit (status "
                       "--preempted_exit_code) within "
                       "this many seconds; set it a little below the scheduler's grace period.")
    flags.DEFINE_integer("preempted_exit_code", _D.preempted_exit_code,
                         "Exit status after SIGTERM and the checkpoint: 75 (EX_TEMPFAIL), or a "
                         "code the scheduler retries (Kubeflow's ExitCode restart policy "
                         "retries 130, 137, 138 and 143).")
    flags.DEFINE_integer("steps_per_loop", _D.steps_per_loop,
                         "Training steps per call into TensorFlow (a graph loop, no Python "
                         "between them); calls end at every validation and checkpoint step. "
                         "Callbacks still see every step, after its call; SIGTERM and a "
                         "stuck-worker check act between calls.")
    flags.DEFINE_integer("log_every", _D.log_every, "Print progress every this many steps.")
    flags.DEFINE_bool("report", _D.report,
                      "Write report.html (curves, throughput, memory) at the end of the run.")
    flags.DEFINE_bool("tensorboard_graph", _D.tensorboard_graph,
                      "Write the model's graph to TensorBoard (logdir/graph) when a run first "
                      "starts.")
    flags.DEFINE_list("callbacks", [],
                      "Keras callbacks of your own: package.module:factory, comma-separated; "
                      "each factory is called with no arguments and returns a callback or a "
                      "list of them (the module must be importable, e.g. on PYTHONPATH). They "
                      "run on the chief only, unless one has the attribute all_workers = True.")


def define_model_flags() -> None:
    """The model's shape and context (tfdp-train, tfdp-plan)."""
    flags.DEFINE_integer("seq_len", _D.seq_len, "Tokens of context per training window.")
    flags.DEFINE_integer("num_layers", _D.num_layers, "Transformer decoder layers.")
    flags.DEFINE_integer("num_heads", _D.num_heads, "Attention heads per layer.")
    flags.DEFINE_integer("hidden_dim", _D.hidden_dim, "Model width (embedding size).")
    flags.DEFINE_integer("intermediate_dim", _D.intermediate_dim, "Feed-forward width.")


def define_train_flags() -> None:
    """Every Config field as a flag, grouped as in Config."""
    define_data_flags()
    flags.DEFINE_string("data", _D.data,
                        "'stdlib' (this Python's standard library sources), a directory "
                        "written by tfdp-prepare, text files/globs/directories, comma-separated, "
                        "or tfds:NAME[/CONFIG][:SPLIT], a TensorFlow Datasets split streamed "
                        "through the tokenizer (validation: its validation or test split).")
    define_tfds_flags()
    define_model_flags()
    flags.DEFINE_float("dropout", _D.dropout, "Dropout rate.")
    flags.DEFINE_integer("global_batch_size", _D.global_batch_size,
                         "Windows per step over ALL replicas; must divide by the replica count.")
    flags.DEFINE_integer("grad_accum_steps", _D.grad_accum_steps,
                         "Split each replica's batch into this many micro-batches, summing "
                         "their gradients before the one all-reduce and update of the step: "
                         "the same update in less memory, and fewer all-reduces per token.")
    flags.DEFINE_integer("train_steps", _D.train_steps, "Optimizer steps to train to.")
    flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak AdamW learning rate.")
    flags.DEFINE_float("min_learning_rate", _D.min_learning_rate,
                       "Learning rate at the end of the cosine decay.")
    flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Steps of linear warmup.")
    flags.DEFINE_float("weight_decay", _D.weight_decay,
                       "AdamW decoupled weight decay (matrices only).")
    flags.DEFINE_float("beta2", _D.beta2, "AdamW second-moment decay.")
    flags.DEFINE_float("clip_norm", _D.clip_norm,
                       "Clip the averaged gradient to this global norm; 0 disables.")
    flags.DEFINE_integer("eval_every", _D.eval_every, "Validate every this many steps.")
    flags.DEFINE_integer("eval_steps", _D.eval_steps,
                         "Validation batches per evaluation; 0 covers the whole split.")
    flags.DEFINE_integer("skip_nonfinite_steps", _D.skip_nonfinite_steps,
                         "Updates whose loss or gradients are NaN/Inf to skip (weights and "
                         "optimizer moments untouched) before training stops; 0 stops at "
                         "the first.")
    define_loop_flags()
    flags.DEFINE_bool("overwrite", _D.overwrite,
                      "Discard a run in --model_dir whose model, data or tokenizer differ "
                      "from these flags, instead of refusing (a compatible run is resumed).")
    flags.DEFINE_integer("seed", _D.seed, "Seed for initial weights, data order and sampling.")
    flags.DEFINE_integer("sample_tokens", _D.sample_tokens,
                         "Tokens to generate as a sample at the end; 0 skips it.")
    flags.DEFINE_string("sample_prompt", _D.sample_prompt,
                        "Prompt for that sample; default: a few lines of held-out "
                        "validation text, labelled as such.")
    define_strategy_flags()
    flags.DEFINE_bool("jit_compile", _D.jit_compile,
                      "Compile each replica's forward/backward with XLA. Default: on, except "
                      "for bf16/fp16 on CPUs, where XLA does not use the CPU's 16-bit matrix "
                      "instructions that TensorFlow's own kernels (oneDNN) use.")
    flags.DEFINE_enum("mixed_precision", _D.mixed_precision, MIXED_PRECISION,
                      "bf16: matmuls and activations in bfloat16 (Keras' mixed_bfloat16 "
                      "policy); fp16: in float16 (mixed_float16) with a dynamic loss scale. "
                      "Weights, optimizer state, checkpoints, the loss and its softmax stay "
                      "float32.")
    define_cluster_flags()
    flags.DEFINE_enum("input_sharding", _D.input_sharding, INPUT_SHARDING,
                      "Multi-worker: auto gives each worker whole shard files of its own when "
                      "there are enough (less memory and I/O; the data order then depends on "
                      "the worker count); interleave makes every worker hold all files and "
                      "take every P-th window of one order, the same for any worker count.")
    flags.DEFINE_enum("all_reduce_dtype", _D.all_reduce_dtype, ALL_REDUCE_DTYPES,
                      "Type the gradients are summed across replicas in; bfloat16 halves the "
                      "bytes sent (about 3 significant digits per replica's gradient).")
    flags.DEFINE_string("model_dir", _D.model_dir,
                        "Directory for checkpoints, TensorBoard logs, metrics and samples; "
                        "an existing run there is resumed.")
    flags.DEFINE_string("init_from", _D.init_from,
                        "A keras-hub GPT-2 preset directory (keras-hub's save_to_preset, "
                        "tfdp-export --format=preset) whose weights start a fresh run; its "
                        "config fixes --num_layers, --num_heads, --hidden_dim, "
                        "--intermediate_dim and the vocabulary, its tokenizer tokenizes the "
                        "text, and --seq_len may not exceed its context. A resumed run "
                        "continues from its own checkpoint.")


def config_from_flags() -> Config:
    cfg = Config(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)})
    if cfg.init_from:
        # The preset fixes the model's shape and tokenizer: fill those fields
        # from it, refusing a flag the user gave that disagrees (tfdp/presets.py).
        from tfdp.presets import resolve  # imports keras-hub: only when needed

        given = {f.name for f in dataclasses.fields(Config) if FLAGS[f.name].present}
        cfg = resolve(cfg, given)[0]
    return cfg


def unescape(template: str | None) -> str | None:
    """A template flag with \\n and \\t as a shell passes them (two
    characters) made a newline and a tab."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")
