"""tfdp-export: a trained run's latest checkpoint as a TF SavedModel or a
keras-hub preset (see tfdp/export.py for what each holds)."""

from absl import flags

from trainer import cli
from trainer.flags import FLAGS

flags.DEFINE_string("model_dir", None, "A directory written by tfdp-train.", required=True)
flags.DEFINE_string("output", None,
                    "Directory to create (new or empty); written through a staging "
                    "directory beside it and renamed at the end.", required=True)
flags.DEFINE_enum("format", "saved_model", ["saved_model", "preset"],
                  "saved_model: TensorFlow SavedModel, signature 'serve' from int32 token_ids "
                  "[batch, time] to float32 logits [batch, time, vocab], plus tfdp's "
                  "tokenizer; preset: a keras-hub preset for "
                  "keras_hub.models.GPT2CausalLM.from_preset (with a GPT2Tokenizer for bpe "
                  "runs) plus tfdp's tokenizer.")


def main() -> None:
    from tfdp.export import export

    export(FLAGS.model_dir, FLAGS.output, FLAGS.format)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
