"""tfdp-eval: loss, perplexity and bits per byte of a trained model over a
whole split, data-parallel like training; or, for a prompt -> completion
fine-tune (or with templates), BLEU, chrF, exact match and F1 of what it
generates for a split of examples."""

from absl import flags

from trainer import cli
from trainer.flags import FLAGS, define_strategy_flags, define_tfds_flags, unescape

flags.DEFINE_string("model_dir", None, "A directory written by tfdp-train.", required=True)
flags.DEFINE_string("data", None,
                    "What to score: a directory written by tfdp-prepare with the model's "
                    "tokenizer, or text (files, globs, a directory, 'stdlib', or a TFDS split "
                    "tfds:NAME[/CONFIG][:SPLIT], SPLIT default train), tokenized with the "
                    "model's tokenizer and scored whole. Default: the run's own val split.")
flags.DEFINE_enum("split", "val", ["train", "val"], "Split of a prepared --data to score.")
flags.DEFINE_integer("batch_size", 0,
                     "Windows per step over all replicas; 0: the run's --global_batch_size. "
                     "Scoring completions: prompts per decoding call on each replica (0: 16).")
flags.DEFINE_bool("json", False, "Print the figures as one JSON object instead.")
flags.DEFINE_string("prompt_template", None, "Score generated completions of the examples in "
                    "--data (JSONL, CSV or tfds:NAME[:SPLIT], split default test) with this "
                    "prompt template (\\n is a newline). Default: a completion fine-tune's own "
                    "templates; other runs are scored on loss unless a template is given.")
flags.DEFINE_string("completion_template", None, "The references' template, as "
                    "--prompt_template.")
flags.DEFINE_integer("max_new_tokens", 32, "Scoring completions: most tokens per example.")
flags.DEFINE_enum("sampler", "greedy", ["greedy", "beam"], "Scoring completions: decoding.")
flags.DEFINE_integer("num_beams", 4, "Scoring completions with --sampler=beam: beams.")
define_strategy_flags()
define_tfds_flags()


def main() -> None:
    from tfdp.evaluation import completion_templates, evaluate, score_completions

    options = {"text_feature": FLAGS.text_feature, "data_dir": FLAGS.tfds_data_dir,
               "download": FLAGS.tfds_download}
    # Generated text is scored for examples: a JSONL file, a template flag,
    # or a completion fine-tune given a file or a TFDS split (a prepared
    # directory, a glob or a directory of text is scored on loss).
    import os
    templates = FLAGS.prompt_template or FLAGS.completion_template
    examples = FLAGS.data and (FLAGS.data.startswith("tfds:") or os.path.isfile(
        os.path.expanduser(FLAGS.data)))
    if FLAGS.data and (templates or FLAGS.data.endswith(".jsonl") or (
            examples and completion_templates(FLAGS.model_dir))):
        score_completions(FLAGS.model_dir, FLAGS.data, unescape(FLAGS.prompt_template),
                          unescape(FLAGS.completion_template), "test", FLAGS.max_new_tokens,
                          FLAGS.sampler, FLAGS.num_beams, FLAGS.batch_size or 16,
                          FLAGS.strategy, FLAGS.num_cpu_replicas, as_json=FLAGS.json,
                          tfds_options=options, collective=FLAGS.collective,
                          allow_cpu=FLAGS.allow_cpu)
        return
    evaluate(FLAGS.model_dir, FLAGS.data, FLAGS.split, FLAGS.batch_size, FLAGS.strategy,
             FLAGS.num_cpu_replicas, as_json=FLAGS.json,
             tfds_options=options, collective=FLAGS.collective, allow_cpu=FLAGS.allow_cpu)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
