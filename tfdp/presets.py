"""Starting a run from a keras-hub GPT-2 preset on local disk (--init_from).

The preset fixes the architecture: layers, heads, width, feed-forward
width, vocabulary size and the longest context. `resolve` fills those
Config fields from the preset's config.json and refuses values the user
set that disagree; --seq_len may be shorter than the preset's context (the
first seq_len rows of its position embedding are used).

The text must be tokenized as the preset's model was trained, so the
preset's tokenizer replaces tfdp's trained one: tfdp's own tokenizer when
the preset holds one (`tfdp_tokenizer/`, written by tfdp-export), else its
GPT2Tokenizer's vocabulary and merges as tfdp's `bpe`. A preset without
a tokenizer (a bare backbone) takes the usual --tokenizer, trained on the
data, sized to the preset's vocabulary by default.

Weights come from the preset only before the first step (tfdp/training.py): a
run that resumes continues from its own checkpoint, so --init_from is not
one of the fields a resume must repeat unchanged; the architecture fields
it fixes are.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os

import numpy as np

from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.export import TFDP_TOKENIZER_DIR  # where tfdp-export keeps tfdp's tokenizer

# Config field -> GPT2Backbone config key: what a preset fixes.
SHAPE_FIELDS = {"num_layers": "num_layers", "num_heads": "num_heads",
                "hidden_dim": "hidden_dim", "intermediate_dim": "intermediate_dim"}


@dataclasses.dataclass(frozen=True)
class Preset:
    """What a preset fixes, read from its JSON files only: nothing here
    starts TensorFlow, whose devices the strategy must set up first."""

    path: str
    backbone: dict  # GPT2Backbone's config: num_layers, ..., vocabulary_size
    tokenizer_kind: str | None  # tfdp's kind of the preset's tokenizer; None: it has none
    tokenizer_size: int | None  # that tokenizer's ids

    @property
    def vocabulary_size(self) -> int:
        return int(self.backbone["vocabulary_size"])

    def tokenizer(self):
        """The preset's tokenizer as a tfdp tokenizer (None for a bare
        backbone): tfdp's own from tfdp_tokenizer/, else its GPT2Tokenizer
        as tfdp's bpe. Loads keras-hub layers: call after the strategy."""
        from tfdp.tokenizers import load_preset_bpe, load_tokenizer  # keras-hub: imported late

        if self.tokenizer_kind is None:
            return None
        own = os.path.join(self.path, TFDP_TOKENIZER_DIR)
        return load_tokenizer(own) if os.path.isdir(own) else load_preset_bpe(self.path)


def read_preset(path: str) -> Preset:
    """Check that `path` is a keras-hub preset of a GPT2Backbone and read its
    config and tokenizer (UserError otherwise, naming what is missing). A
    run reads it more than once (flags, data, weights): cached."""
    return _read_preset(os.path.abspath(os.path.expanduser(path)))


@functools.lru_cache(maxsize=4)
def _read_preset(path: str) -> Preset:
    where = f"--init_from={path}"
    if not os.path.isdir(path):
        raise UserError(f"{where} is not a directory; give a keras-hub preset directory "
                        "(e.g. written by tfdp-export --format=preset or save_to_preset)")
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{where} is not a keras-hub preset (no config.json); give a "
                        "directory written by save_to_preset or tfdp-export --format=preset") \
            from None
    except ValueError as err:
        raise UserError(f"{where}/config.json is not JSON ({err}); give an intact preset") \
            from None
    name = config.get("class_name") if isinstance(config, dict) else None
    if name != "GPT2Backbone":
        raise UserError(f"{where} holds {'a ' + name if name else 'no keras-hub backbone'}, "
                        "not a GPT2Backbone; tfdp trains GPT-2 models")
    if not (os.path.isfile(os.path.join(path, "model.weights.h5"))
            or glob.glob(os.path.join(path, "model_*.weights.h5"))):
        raise UserError(f"{where} has no weights (model.weights.h5); give a preset saved "
                        "with its weights")
    return Preset(path, config["config"], *_tokenizer_info(path))


def _tokenizer_info(path: str) -> tuple[str | None, int | None]:
    """(tfdp kind, vocabulary size) of the preset's tokenizer, from its
    files: tfdp's own (tfdp_tokenizer/tokenizer.json) first, else a
    GPT2Tokenizer's vocabulary.json; (None, None) for a bare backbone."""
    own = os.path.join(path, TFDP_TOKENIZER_DIR, "tokenizer.json")
    hub = os.path.join(path, "tokenizer.json")
    try:
        if os.path.isfile(own):
            with open(own, encoding="utf-8") as f:
                meta = json.load(f)
            return meta["kind"], int(meta["vocab_size"])
        if not os.path.isfile(hub):
            return None, None
        with open(hub, encoding="utf-8") as f:
            name = json.load(f).get("class_name")
        if name != "GPT2Tokenizer":
            raise UserError(f"--init_from={path} has a {name} tokenizer; tfdp reads a "
                            "preset's GPT2Tokenizer or its own (tfdp_tokenizer/)")
        with open(os.path.join(path, "assets", "tokenizer", "vocabulary.json"),
                  encoding="utf-8") as f:
            return "bpe", len(json.load(f))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"the tokenizer of --init_from={path} is unreadable ({err}); give a "
                        "preset saved by keras-hub or tfdp-export") from None


def resolve(cfg: Config, explicit) -> tuple[Config, Preset]:
    """`cfg` with the fields the preset at cfg.init_from fixes filled in:
    model shape, tokenizer kind and vocabulary size. `explicit` names the
    fields the user set (trainer/: the flags given); one that disagrees
    with the preset is an error naming the flag and the preset's value."""
    from tfdp.tokenizers import ByteTokenizer

    preset = read_preset(cfg.init_from)
    where = f"--init_from={preset.path}"
    values = {field: int(preset.backbone[key]) for field, key in SHAPE_FIELDS.items()}
    if preset.tokenizer_kind is not None:
        values.update(tokenizer=preset.tokenizer_kind, vocab_size=preset.tokenizer_size)
    elif cfg.tokenizer != "byte" and "vocab_size" not in explicit:
        # A tokenizer trained on the data fills the preset's embedding rows.
        values["vocab_size"] = preset.vocabulary_size
    for field, value in values.items():
        if field in explicit and getattr(cfg, field) != value:
            what = {"tokenizer": f"the preset's tokenizer is {value}",
                    "vocab_size": f"the preset's tokenizer has {value} ids"}.get(
                        field, f"the preset has {field}={value}")
            raise UserError(f"--{field}={getattr(cfg, field)} disagrees with {where}: "
                            f"{what}; omit --{field} (the preset fixes it)")
    max_len = int(preset.backbone["max_sequence_length"])
    if cfg.seq_len > max_len:
        if "seq_len" in explicit:
            raise UserError(f"--seq_len={cfg.seq_len} is longer than the context of {where} "
                            f"(max_sequence_length={max_len}); use --seq_len <= {max_len}")
        values["seq_len"] = max_len  # the default is longer than this preset allows
    if preset.tokenizer_kind is not None:
        check_vocabulary(preset.tokenizer_size, preset)
    elif cfg.tokenizer == "byte":
        check_vocabulary(ByteTokenizer.vocab_size, preset)
    else:  # the size the data's tokenizer will be trained to
        check_vocabulary(values.get("vocab_size", cfg.vocab_size) or 0, preset)
    return dataclasses.replace(cfg, **values), preset


def explicit_fields(cfg: Config) -> set[str]:
    """The fields of `cfg` that differ from Config's defaults: what a caller
    of tfdp.training.train chose (trainer/ knows which flags were given)."""
    default = Config()
    return {f.name for f in dataclasses.fields(Config)
            if getattr(cfg, f.name) != getattr(default, f.name)}


def data_tokenizer(cfg: Config):
    """What tokenizes text prepared for a run: the preset's tokenizer when
    --init_from has one, else the --tokenizer kind to train."""
    tokenizer = read_preset(cfg.init_from).tokenizer() if cfg.init_from else None
    return tokenizer if tokenizer is not None else cfg.tokenizer


def check_data(preset: Preset, tokenizer, data: str) -> None:
    """The data's tokenizer must be the preset's (when it has one) and fit
    its embedding."""
    own = preset.tokenizer()
    if own is not None and not same_tokenizer(own, tokenizer):
        raise UserError(f"--data={data} was tokenized with another tokenizer than "
                        f"--init_from={preset.path}'s; give the text itself (it is then "
                        "tokenized with the preset's tokenizer)")
    check_vocabulary(tokenizer.vocab_size, preset)


def check_vocabulary(vocab_size: int, preset: Preset) -> None:
    """A tokenizer may not have more ids than the preset's embedding rows."""
    if vocab_size > preset.vocabulary_size:
        raise UserError(f"the tokenizer has {vocab_size} ids, more than the "
                        f"{preset.vocabulary_size} rows of the token embedding of "
                        f"--init_from={preset.path}; use a tokenizer of at most "
                        f"{preset.vocabulary_size} ids")


def same_tokenizer(a, b) -> bool:
    """Whether tfdp tokenizers `a` and `b` map text to the same ids: the
    same kind and the same saved vocabulary (JSON compared as values, so
    key order does not matter)."""
    import tempfile

    def saved(tok, directory):
        tok.save(directory)
        out = {}
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
            out[name] = json.loads(data) if name.endswith(".json") else data
        return out
    with tempfile.TemporaryDirectory() as x, tempfile.TemporaryDirectory() as y:
        return a.kind == b.kind and saved(a, x) == saved(b, y)


def load_weights(model, preset: Preset, seq_len: int, log) -> None:
    """Copy the preset's weights into `model` (tfdp.model.build_model with
    the resolved config, built under the strategy scope; assigning to its
    mirrored variables updates every replica). The position embedding keeps
    its first seq_len rows, the token embedding its first vocabulary-size
    rows when tfdp's tokenizer has fewer ids than the preset (ids it never
    produces)."""
    import keras_hub

    # Loaded plain, in float32, outside any strategy: it is only a source
    # of values, dropped at the end.
    source = keras_hub.models.GPT2Backbone.from_preset(preset.path, dtype="float32")
    targets, values = model.backbone.weights, source.weights
    if [w.path for w in targets] != [w.path for w in values]:
        raise UserError(f"the weights of --init_from={preset.path} do not line up with a "
                        "GPT2Backbone of its own config; give a preset saved by keras-hub")
    for target, value in zip(targets, values):
        value = np.asarray(value.numpy())
        shape = tuple(target.shape)
        if shape != value.shape:
            # Only embeddings differ, in rows: resolve() fixed everything else.
            assert shape[1:] == value.shape[1:] and shape[0] < value.shape[0], (
                target.path, shape, value.shape)
            value = value[:shape[0]]
        target.assign(value)
    log(f"initialised from --init_from={preset.path}")
    vocab = int(model.backbone.vocabulary_size)
    if vocab < preset.vocabulary_size:
        log(f"note: the tokenizer has {vocab} ids and --init_from's embedding "
            f"{preset.vocabulary_size} rows; the first {vocab} are used")
