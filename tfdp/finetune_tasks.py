"""What each `tfdp-finetune --task` adds to the fine-tuning job
(tfdp/finetuning.py): its examples read and tokenized, its Task, what the
job records and writes beside its checkpoints. Adding a fine-tuning task is
adding a Task module (tfdp/tasks/) and one function here."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import tensorflow as tf

from tfdp import classdata, completiondata
from tfdp.atomic import write_text
from tfdp.config import FinetuneConfig
from tfdp.tasks.classification import ClassificationTask
from tfdp.tasks.completion import CompletionTask, Scoring


@dataclasses.dataclass
class Setup:
    """One --task's part of a fine-tune."""

    task: object
    seq_len: int
    train_examples: int
    eval_examples: int
    rows: int  # what an epoch steps through: examples, or packed windows
    config: dict  # recorded in the job's config and metrics
    summary: str  # for the log
    # The job's own config file: a completion's output is also a tfdp run,
    # whose config.json is the model's (tfdp/config.py Config).
    config_file: str = "config.json"
    shown: tuple = ("eval_accuracy",)  # the final log line's metrics
    files: dict = dataclasses.field(default_factory=dict)  # name -> JSON content
    metrics: dict = dataclasses.field(default_factory=dict)  # added to the final metrics

    def write_files(self, work: str, pretrained, output_dir: str) -> None:
        """What the output holds beside the fine-tune's config and
        checkpoints (the chief, before training)."""
        for name, content in self.files.items():
            write_text(os.path.join(work, name), json.dumps(content, indent=2))

    def write_final(self, work: str, model) -> None:
        """What the output adds at the end (the chief, before publishing)."""


class _ClassificationSetup(Setup):
    def write_final(self, work: str, model) -> None:
        # The final weights, apart from the loop's checkpoints
        # (tfdp/finetuning.py load_finetuned reads them).
        tf.train.Checkpoint(backbone=model.backbone, head=model.head).write(
            os.path.join(work, "checkpoint", "ckpt"))


class _CompletionSetup(Setup):
    def write_files(self, work: str, pretrained, output_dir: str) -> None:
        """config.json (the model's Config) and tokenizer/ (the pretrained
        run's or preset's), so the published output_dir is a run every
        command reads (generate, eval, export); its checkpoints/ are the
        loop's."""
        super().write_files(work, pretrained, output_dir)
        run_cfg = dataclasses.replace(pretrained.cfg, model_dir=output_dir,
                                      mixed_precision="off", init_from=None)
        write_text(os.path.join(work, "config.json"), run_cfg.to_json())
        tokenizer_dir = os.path.join(work, "tokenizer")
        if not os.path.isdir(tokenizer_dir):  # whole or not at all: a resume rewrites it
            staged = tokenizer_dir + ".partial"
            shutil.rmtree(staged, ignore_errors=True)
            os.makedirs(staged)
            pretrained.tokenizer.save(staged)
            os.replace(staged, tokenizer_dir)


def classification(fc: FinetuneConfig, pretrained) -> Setup:
    cfg, tokenizer = pretrained.cfg, pretrained.tokenizer
    read = dict(text_column=fc.text_column, label_column=fc.label_column,
                tfds_data_dir=fc.tfds_data_dir, tfds_download=fc.tfds_download)
    train_ex = classdata.read_examples(fc.train, default_split="train", flag="--train", **read)
    eval_ex = classdata.read_examples(fc.eval, default_split="test", flag="--eval", **read)
    classes, train_labels, eval_labels = classdata.resolve_labels(train_ex, eval_ex)
    train_ids = tokenizer.encode(train_ex.texts)
    eval_ids = tokenizer.encode(eval_ex.texts)
    longest = max(len(x) for x in train_ids + eval_ids) + 1
    seq_len = fc.seq_len or min(longest, cfg.seq_len)
    task = ClassificationTask(
        cfg, tokenizer.vocab_size, len(classes), fc.pooling, seq_len, fc.seed, pretrained,
        train=(*classdata.pack(train_ids, seq_len, tokenizer.eot_id), train_labels),
        evaluation=(*classdata.pack(eval_ids, seq_len, tokenizer.eot_id), eval_labels))
    truncated = sum(len(x) >= seq_len for x in train_ids)
    return _ClassificationSetup(
        task, seq_len, len(train_labels), len(eval_labels), len(train_labels),
        {"num_classes": len(classes)},
        f"{len(classes)} classes; {truncated:,} train texts truncated",
        files={"labels.json": {"classes": classes, "ids": {c: i for i, c in enumerate(classes)}}},
        metrics={"classes": classes})


def completion(fc: FinetuneConfig, pretrained) -> Setup:
    cfg, tokenizer = pretrained.cfg, pretrained.tokenizer
    read = dict(tfds_data_dir=fc.tfds_data_dir, tfds_download=fc.tfds_download)
    train_ex = completiondata.read_completions(fc.train, fc.prompt_template,
                                               fc.completion_template, "train", "--train", **read)
    eval_ex = completiondata.read_completions(fc.eval, fc.prompt_template,
                                              fc.completion_template, "test", "--eval", **read)
    # The window is the model's: prompts and completions vary in length, and
    # packing fills it.
    seq_len = fc.seq_len or cfg.seq_len
    train_tok = completiondata.tokenize(train_ex, tokenizer, seq_len)
    eval_tok = completiondata.tokenize(eval_ex, tokenizer, seq_len)
    # Packing follows a seeded shuffle, so windows mix examples of every
    # kind; each epoch then permutes the windows.
    order = np.random.default_rng(fc.seed).permutation(len(train_tok.tokens))
    train_w = completiondata.windows(train_tok, seq_len, fc.pack, order)
    eval_w = completiondata.windows(eval_tok, seq_len, fc.pack)
    scored = slice(0, fc.score_examples)
    scoring = Scoring(eval_ex.prompts[scored], eval_ex.references[scored], tokenizer,
                      fc.max_new_tokens, fc.sampler, fc.num_beams)
    task = CompletionTask(cfg, tokenizer.vocab_size, seq_len, fc.seed, pretrained,
                          train=train_w, evaluation=eval_w, scoring=scoring)
    cut = train_tok.prompts_cut + eval_tok.prompts_cut
    long = train_tok.completions_cut + eval_tok.completions_cut
    layout = "packed" if fc.pack else "one example each"
    return _CompletionSetup(
        task, seq_len, len(train_ex.prompts), len(eval_ex.prompts), len(train_w),
        {"train_windows": len(train_w), "eval_windows": len(eval_w), "prompts_cut": cut,
         "completions_cut": long, "loss_fraction": round(train_w.loss_fraction, 4)},
        f"{len(train_w):,} train windows ({layout}, {100 * train_w.loss_fraction:.1f}% of "
        f"targets carry loss); {cut:,} prompts cut from the left to fit, {long:,} "
        "completions longer than the window cut",
        config_file="finetune.json",
        shown=("eval_loss", "eval_bleu", "eval_chrf", "eval_exact_match", "eval_f1",
               "eval_accuracy"))


SETUPS = {"classification": classification, "completion": completion}
