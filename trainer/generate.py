"""tfdp-generate: sample text from the latest checkpoint in --model_dir: one
--prompt, or every example of an --input file into an --output JSONL file,
in batches, data-parallel."""

from absl import flags

from tfdp.config import SAMPLERS
from trainer import cli
from trainer.flags import FLAGS, define_strategy_flags, define_tfds_flags, unescape

flags.DEFINE_string("model_dir", None, "A directory written by tfdp-train.", required=True)
flags.DEFINE_string("prompt", "", "Text to continue; empty starts a new document.")
flags.DEFINE_integer("max_length", 200, "Tokens to generate.")
flags.DEFINE_enum("sampler", "top_k", SAMPLERS, "keras-hub sampler.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (top_k and top_p).")
flags.DEFINE_integer("top_k", 40, "k for --sampler=top_k.")
flags.DEFINE_float("top_p", 0.9, "p for --sampler=top_p.")
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text (with "
                     "--input: on the same number of replicas).")
flags.DEFINE_integer("num_beams", 4, "Beams for --sampler=beam.")
flags.DEFINE_string("input", None, "Complete many prompts: a JSONL file (one object per line), "
                    "a CSV file or tfds:NAME[:SPLIT]; each example's prompt is "
                    "--prompt_template over its fields. Needs --output.")
flags.DEFINE_string("output", None, "With --input: a new JSONL file, one line per example in "
                    "input order: its fields plus \"generated\".")
flags.DEFINE_string("prompt_template", None, "With --input: the prompt of each example, a "
                    "Python format string over its fields (\\n is a newline). Default: a "
                    "completion fine-tune's own, else {prompt}.")
flags.DEFINE_integer("batch_size", 16, "With --input: prompts per decoding call and replica.")
define_strategy_flags()
define_tfds_flags()


def main() -> None:
    from tfdp.errors import UserError

    if bool(FLAGS.input) != bool(FLAGS.output):
        raise UserError("--input and --output go together: give both to complete a file, or "
                        "neither to continue --prompt")
    from tfdp.generate import generate, make_sampler

    def sampler(vocab_size=None):
        return make_sampler(FLAGS.sampler, FLAGS.temperature, FLAGS.seed, FLAGS.top_k,
                            FLAGS.top_p, vocab_size=vocab_size, num_beams=FLAGS.num_beams)
    if FLAGS.input:
        from tfdp.decoding import complete_file
        from tfdp.strategy import build_strategy
        strategy = build_strategy(FLAGS.strategy, FLAGS.num_cpu_replicas,
                                  collective=FLAGS.collective, allow_cpu=FLAGS.allow_cpu)
        from tfdp.evaluation import completion_templates
        template = unescape(FLAGS.prompt_template) or (
            completion_templates(FLAGS.model_dir) or {"prompt_template": "{prompt}"}
        )["prompt_template"]
        complete_file(FLAGS.model_dir, FLAGS.input, FLAGS.output, template, FLAGS.max_length,
                      sampler, FLAGS.batch_size, strategy, tfds_data_dir=FLAGS.tfds_data_dir,
                      tfds_download=FLAGS.tfds_download)
        return
    from tfdp.restore import load_trained

    model, tokenizer, cfg = load_trained(FLAGS.model_dir)
    sampler = sampler(tokenizer.vocab_size)
    print(FLAGS.prompt + generate(model, tokenizer, FLAGS.prompt, FLAGS.max_length, sampler,
                                  cfg.seq_len))


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
