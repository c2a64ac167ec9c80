"""tfdp-prepare: turn text into token shards, a tokenizer and manifest.json."""

from absl import flags

from trainer import cli
from trainer.flags import FLAGS, define_data_flags

flags.DEFINE_string("input", None, "Text files, globs or directories, comma-separated "
                    "(or 'stdlib').", required=True)
flags.DEFINE_string("output", None, "New directory for the prepared data.", required=True)
define_data_flags()


def main() -> None:
    from tfdp import recipes
    from tfdp.config import Config
    from tfdp.prepare import prepare

    Config(tokenizer=FLAGS.tokenizer, vocab_size=FLAGS.vocab_size,
           val_fraction=FLAGS.val_fraction).validate()
    manifest = prepare(recipes.source_files(FLAGS.input), FLAGS.output, FLAGS.tokenizer,
                       FLAGS.vocab_size, FLAGS.val_fraction)
    splits = manifest["splits"]
    print(f"wrote {FLAGS.output}: {manifest['tokenizer']} tokenizer, vocabulary "
          f"{manifest['vocab_size']}, {splits['train']['tokens']:,} train and "
          f"{splits['val']['tokens']:,} validation tokens")


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
