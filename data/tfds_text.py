"""A TensorFlow Datasets split as a stream of text documents (`--data=tfds:...`).

    tfds:NAME[/CONFIG][:SPLIT]     e.g. tfds:tiny_shakespeare,
                                   tfds:wikipedia/20230601.en:train[:90%]

SPLIT (default `train`, TFDS slicing allowed) is what training streams. Each
input pipeline of the job reads its own files of it through
`tfds.ReadConfig(input_context=...)` when the split has at least one file per
pipeline; otherwise every pipeline reads all of it (tfdp/stream.py then gives
each pipeline every P-th window).

Validation is the dataset's `validation` split, else its `test` split, else
the last `val_fraction` of SPLIT's examples (training then reads the rest);
it is read once, at most `MAX_VAL_BYTES` of it, and kept as token shards so
every evaluation scores the same text.

Nothing is downloaded unless asked (`download=True`, `--tfds_download`): the
data must already be in `data_dir` (TFDS' default `~/tensorflow_datasets`),
where a dataset prepared by any TFDS builder is found from its files alone.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfdp.errors import UserError

PREFIX = "tfds:"
MAX_VAL_BYTES = 16 << 20  # validation is scored whole at every evaluation


def is_tfds(spec: str | None) -> bool:
    return bool(spec) and spec.strip().startswith(PREFIX)


def _tfds():
    # Imported on use: TFDS takes seconds to import and most runs read files.
    import tensorflow_datasets as tfds
    return tfds


class TfdsText:
    """One dataset's training split, validation split and text feature,
    checked on construction (UserError names what is wrong and the fix)."""

    def __init__(self, spec: str, text_feature: str | None = "text",
                 data_dir: str | None = None, download: bool = False,
                 default_split: str = "train", flag: str = "--data"):
        """`text_feature=None` leaves the features to the caller (tfdp-finetune
        reads a text and a label); `flag` names the flag in error messages."""
        self.spec, self.flag = spec.strip(), flag
        name, _, split = self.spec[len(PREFIX):].partition(":")
        if not name:
            raise UserError(f"{flag}={spec} names no dataset; write tfds:NAME[/CONFIG][:SPLIT], "
                            "e.g. tfds:tiny_shakespeare")
        self.name, self.feature, self.split = name, text_feature, split or default_split
        self.builder = self._builder(name, data_dir, download)
        if self._split_info(self.split).num_examples == 0:
            raise UserError(f"{flag}={self.spec}: split {self.split!r} has no examples; "
                            "choose a larger slice")
        if text_feature is not None:
            self._check_feature()

    def _builder(self, name: str, data_dir: str | None, download: bool):
        tfds = _tfds()
        where = data_dir or "TFDS' default data directory (~/tensorflow_datasets)"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise UserError(f"{self.flag}=tfds:{name}: TFDS knows no dataset {name!r} and there is "
                            f"none in {where}; check the name (tfds.list_builders()) or point "
                            "--tfds_data_dir at the directory that holds it") from None
        except ValueError as err:  # an unknown config
            raise UserError(f"{self.flag}=tfds:{name}: {str(err).splitlines()[0]}; check the "
                            "config after the '/'") from None
        if not builder.is_prepared():
            if not download:
                raise UserError(f"{self.flag}=tfds:{name} is not in {where}; pass --tfds_download "
                                "to download and prepare it, or --tfds_data_dir where it is")
            builder.download_and_prepare()
        return builder

    def _split_info(self, split: str):
        try:
            return self.builder.info.splits[split]
        except (ValueError, KeyError, AssertionError) as err:
            known = ", ".join(self.builder.info.splits.keys())
            raise UserError(f"{self.flag}={self.spec}: no split {split!r} ({str(err).splitlines()[0]});"
                            f" {self.name} has {known}") from None

    def train_and_val(self, val_fraction: float) -> tuple[str, str]:
        """(training split, validation split) as TFDS split strings (module doc)."""
        split, info = self.split, self._split_info(self.split)
        base = split.split("[")[0]  # a slice of "test" must not validate on "test"
        for candidate in ("validation", "test"):
            if candidate in self.builder.info.splits and candidate != base:
                return split, candidate
        if "[" in split:
            raise UserError(f"{self.flag}={self.spec}: {self.name} has no validation or test split "
                            "to validate on, and tfdp cannot hold out part of a slice; name a "
                            "whole split (then its last --val_fraction is held out)")
        held = math.ceil(info.num_examples * val_fraction)
        if held >= info.num_examples:
            raise UserError(f"{self.flag}={self.spec}: split {split!r} has {info.num_examples} "
                            f"example(s), too few to hold out --val_fraction={val_fraction} "
                            "for validation and train on the rest; use a dataset with a "
                            "validation split or more examples")
        first_val = info.num_examples - held
        return f"{split}[:{first_val}]", f"{split}[{first_val}:]"

    def _check_feature(self) -> None:
        tfds = _tfds()
        features = self.builder.info.features
        texts = [k for k, v in features.items() if isinstance(v, tfds.features.Text)
                 or getattr(v, "tf_dtype", None) == tf.string]
        if self.feature not in texts:
            raise UserError(f"--text_feature={self.feature!r} is not a text feature of "
                            f"{self.name} (its text features: {', '.join(texts) or 'none'}); "
                            "pick one with --text_feature")

    def num_files(self, split: str) -> int:
        return len(self._split_info(split).file_instructions)

    def text_dataset(self, split: str, ctx: tf.distribute.InputContext | None = None,
                     seed: int | None = None) -> tf.data.Dataset:
        """`split`'s documents as scalar tf.string. With `ctx`, only this input
        pipeline's files; with `seed`, files in a seeded shuffled order, else
        in their stored order."""
        tfds = _tfds()
        config = tfds.ReadConfig(input_context=ctx, shuffle_seed=seed,
                                 try_autocache=False)  # no copy of a large split in memory
        ds = self.builder.as_dataset(split=split, shuffle_files=seed is not None,
                                     read_config=config)
        return ds.map(lambda example: example[self.feature],
                      num_parallel_calls=tf.data.AUTOTUNE)

    def documents(self, split: str, max_bytes: int) -> tuple[list[bytes], bool]:
        """`split`'s first documents in stored order, up to `max_bytes`
        bytes in all; and whether that was the whole split."""
        docs, total = [], 0
        for text in self.text_dataset(split).as_numpy_iterator():
            if total + len(text) > max_bytes:
                cut = max_bytes - total
                while 0 < cut and (text[cut] & 0xC0) == 0x80:
                    cut -= 1  # do not split a multi-byte character
                docs.append(text[:cut])
                return [d for d in docs if d], False
            docs.append(text)
            total += len(text)
        return [d for d in docs if d], True
