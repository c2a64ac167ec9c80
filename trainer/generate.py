"""tfdp-generate: sample text from the latest checkpoint in --model_dir."""

from absl import flags

from tfdp.config import SAMPLERS
from trainer import cli
from trainer.flags import FLAGS

flags.DEFINE_string("model_dir", None, "A directory written by tfdp-train.", required=True)
flags.DEFINE_string("prompt", "", "Text to continue; empty starts a new document.")
flags.DEFINE_integer("max_length", 200, "Tokens to generate.")
flags.DEFINE_enum("sampler", "top_k", SAMPLERS, "keras-hub sampler.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (top_k and top_p).")
flags.DEFINE_integer("top_k", 40, "k for --sampler=top_k.")
flags.DEFINE_float("top_p", 0.9, "p for --sampler=top_p.")
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.")


def main() -> None:
    from tfdp.generate import generate, make_sampler
    from tfdp.restore import load_trained

    model, tokenizer, cfg = load_trained(FLAGS.model_dir)
    sampler = make_sampler(FLAGS.sampler, FLAGS.temperature, FLAGS.seed, FLAGS.top_k, FLAGS.top_p,
                           vocab_size=tokenizer.vocab_size)
    print(FLAGS.prompt + generate(model, tokenizer, FLAGS.prompt, FLAGS.max_length, sampler,
                                  cfg.seq_len))


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
