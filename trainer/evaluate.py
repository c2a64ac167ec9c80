"""tfdp-eval: loss, perplexity and bits per byte of a trained model over a
whole split, data-parallel like training."""

from absl import flags

from trainer import cli
from trainer.flags import FLAGS, define_strategy_flags, define_tfds_flags

flags.DEFINE_string("model_dir", None, "A directory written by tfdp-train.", required=True)
flags.DEFINE_string("data", None,
                    "What to score: a directory written by tfdp-prepare with the model's "
                    "tokenizer, or text (files, globs, a directory, 'stdlib', or a TFDS split "
                    "tfds:NAME[/CONFIG][:SPLIT], SPLIT default train), tokenized with the "
                    "model's tokenizer and scored whole. Default: the run's own val split.")
flags.DEFINE_enum("split", "val", ["train", "val"], "Split of a prepared --data to score.")
flags.DEFINE_integer("batch_size", 0,
                     "Windows per step over all replicas; 0: the run's --global_batch_size.")
flags.DEFINE_bool("json", False, "Print the figures as one JSON object instead.")
define_strategy_flags()
define_tfds_flags()


def main() -> None:
    from tfdp.evaluation import evaluate

    evaluate(FLAGS.model_dir, FLAGS.data, FLAGS.split, FLAGS.batch_size, FLAGS.strategy,
             FLAGS.num_cpu_replicas, as_json=FLAGS.json,
             tfds_options={"text_feature": FLAGS.text_feature,
                           "data_dir": FLAGS.tfds_data_dir, "download": FLAGS.tfds_download},
             collective=FLAGS.collective, allow_cpu=FLAGS.allow_cpu)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
