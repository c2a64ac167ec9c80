"""tfdp-report: loss curves and a self-contained HTML report of a run
(model_dir/report.html, loss.png, training.png)."""

from absl import flags

from trainer import cli
from trainer.flags import FLAGS

flags.DEFINE_string("model_dir", None,
                    "A directory written by tfdp-train, finished or still training.",
                    required=True)


def main() -> None:
    from tfdp.report import write_report

    html_path, png_path = write_report(FLAGS.model_dir)
    print(f"report: {html_path}")
    print(f"loss curves: {png_path}")


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
