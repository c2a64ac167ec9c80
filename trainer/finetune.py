"""tfdp-finetune: a pretrained GPT (a tfdp run or a keras-hub preset)
fine-tuned as a text classifier or prompt -> completion, data-parallel like
training."""

from absl import flags

from trainer import cli
from trainer.flags import FLAGS, define_loop_flags, define_strategy_flags, unescape

flags.DEFINE_string("model_dir", None, "A directory written by tfdp-train (its newest "
                    "readable checkpoint is the starting point); or give --init_from.")
flags.DEFINE_string("init_from", None, "Instead of --model_dir: a keras-hub GPT-2 preset "
                    "directory on local disk, with its tokenizer (keras-hub's save_to_preset "
                    "of a GPT2CausalLM, or tfdp-export --format=preset); its weights are the "
                    "starting point, its tokenizer tokenizes the examples. Nothing is "
                    "downloaded.")
flags.DEFINE_string("task", "classification", "What to fine-tune for: classification (a "
                    "label per text, a new head) or completion (prompt -> completion: "
                    "translation, question answering, instructions, label words; the loss "
                    "falls on the completion only).")
flags.DEFINE_string("train", None, "Training examples: a JSONL file (one object per line), "
                    "a CSV file with a header row, or tfds:NAME[/CONFIG][:SPLIT] (split "
                    "default: train).", required=True)
flags.DEFINE_string("eval", None, "Held-out examples, as --train (TFDS split default: test); "
                    "the evaluations score them.", required=True)
flags.DEFINE_string("output_dir", None, "New (or empty) directory for the fine-tuned "
                    "weights, config.json, labels.json, metrics.json, TensorBoard logs and a "
                    "report; it appears when the fine-tune ends (until then the work is in "
                    ".NAME.tfdp-partial beside it, and rerunning the same command resumes "
                    "it).", required=True)
flags.DEFINE_string("prompt_template", "{prompt}", "--task=completion: the prompt, a Python "
                    "format string over each example's fields (\\n in it is a newline), e.g. "
                    "'German: {de}\\nEnglish:' "
                    "or '{context}\\nQ: {question}\\nA:' (nested TFDS features as "
                    "{answers/text}; a ClassLabel gives its name).")
flags.DEFINE_string("completion_template", "{completion}", "--task=completion: what the model "
                    "learns to write after the prompt, e.g. ' {en}'; a list field (squad's "
                    "{answers/text}) trains on its first element and scores against all.")
flags.DEFINE_bool("pack", True, "--task=completion: put several examples in one window (each "
                  "sees only itself), so no compute is spent on padding.")
flags.DEFINE_integer("score_examples", 64, "--task=completion: at every evaluation, decode "
                     "the first this many eval examples (data-parallel) and score the text: "
                     "BLEU, chrF, exact match, F1, and accuracy for label words; 0: loss only.")
flags.DEFINE_integer("max_new_tokens", 32, "--task=completion: most tokens decoded per example "
                     "when scoring (it stops at end-of-text).")
flags.DEFINE_enum("sampler", "greedy", ["greedy", "beam"], "--task=completion: decoding for "
                  "scores: greedy, or beam search (--num_beams).")
flags.DEFINE_integer("num_beams", 4, "--task=completion --sampler=beam: beams per example.")
flags.DEFINE_string("text_column", "text", "CSV column or TFDS feature holding the text.")
flags.DEFINE_string("label_column", "label", "CSV column or TFDS feature holding the label: "
                    "integers 0..K-1, or class names (ids in sorted order).")
flags.DEFINE_enum("pooling", "last", ["last", "mean"], "What the head reads: the last real "
                  "token's hidden state (the EOT after the text) or the mean over real tokens.")
flags.DEFINE_integer("seq_len", 0, "Tokens per example (classification: texts keep their "
                     "first tokens; completion: prompts lose their first tokens); 0: "
                     "classification the longest example, completion the model's seq_len, "
                     "at most the model's seq_len.")
flags.DEFINE_integer("global_batch_size", 32, "Examples (completion: windows) per step over "
                     "ALL replicas; must divide by the replica count.")
flags.DEFINE_float("epochs", 3.0, "Passes over the training examples.")
flags.DEFINE_integer("train_steps", 0, "Optimizer steps; > 0 overrides --epochs.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate (warmup, then cosine to 0).")
flags.DEFINE_float("warmup_fraction", 0.1, "Fraction of the steps spent warming up.")
flags.DEFINE_float("weight_decay", 0.01, "AdamW decoupled weight decay (matrices only).")
flags.DEFINE_float("clip_norm", 1.0, "Clip the averaged gradient to this global norm; 0: off.")
flags.DEFINE_integer("eval_every", 0, "Also evaluate every this many steps; 0: at the end only.")
flags.DEFINE_integer("seed", 1234, "Seed for the head's initial weights and the data order.")
flags.DEFINE_bool("jit_compile", None, "Compile each replica's forward/backward with XLA "
                  "(default: on).")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for tfds: sources "
                    "(default: TFDS's own, ~/tensorflow_datasets).")
flags.DEFINE_bool("tfds_download", False, "Let TFDS download and prepare a missing dataset.")
define_strategy_flags()
define_loop_flags()


def main() -> None:
    import dataclasses
    import sys

    from tfdp.config import FinetuneConfig

    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(FinetuneConfig)}
    for name in ("prompt_template", "completion_template"):
        values[name] = unescape(values[name])
    fc = FinetuneConfig(**values).validate()
    from tfdp.callbacks import from_factories  # TensorFlow loads from here on
    from tfdp.finetuning import finetune

    # A terminal gets a progress bar redrawn in place; logs and pipes get lines.
    finetune(fc, callbacks=from_factories(FLAGS.callbacks),
             live=sys.stdout if sys.stdout.isatty() else None)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
