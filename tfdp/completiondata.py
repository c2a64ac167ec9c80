"""Prompt -> completion examples for fine-tuning: templates, tokens, windows.

    records (tfdp/records.py) -> templates -> (prompt, completion,
    references) -> token ids -> windows (one example each, or packed)

Templates are Python format strings over a record's fields:
`--prompt_template='German: {de}\\nEnglish:' --completion_template=' {en}'`
(wmt14_translate/de-en), `'{context}\\nQ: {question}\\nA:'` and
`' {answers/text}'` (squad), `'{sentence}\\nSentiment:'` and `' {label}'`
(glue/sst2: a TFDS ClassLabel field gives its name, so the completion is a
label word). A field holding a list gives one reference per element: the
first is what training learns, all of them count when scoring (squad's
several answers). The default templates read TRL's prompt-completion JSONL,
`{"prompt": ..., "completion": ...}`.

Tokens: EOT, the prompt, the completion, EOT; the EOT in front starts a new
document as in pretraining (generation prompts the same way). The loss
falls on the completion and its closing EOT only. An example longer than
the window loses the START of its prompt (the part nearest the completion
is what matters for it), and only if the completion alone does not fit,
the end of its completion, which then has no closing EOT to learn (it did
not end there); both are counted.

Windows are the model's seq_len + 1 tokens with, per input position, the
example it belongs to (segment, 0 for padding), its position inside that
example and the weight of its target. `pack=True` puts several examples in
one window (next-fit, in order: an example joins the last window if it
fits): the attention mask (segment == segment) and the per-example
positions make each example's logits exactly what they are alone
(tfdp/model.py's segment_logits), so packing changes only the compute
spent on padding.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from tfdp.errors import UserError
from tfdp.records import Records, read_records

DEFAULT_PROMPT_TEMPLATE = "{prompt}"
DEFAULT_COMPLETION_TEMPLATE = "{completion}"


@dataclasses.dataclass
class Completions:
    """Examples of one source: `references[i][0]` is example i's completion."""

    what: str
    prompts: list[str]
    references: list[list[str]]
    where: list[str]

    @property
    def completions(self) -> list[str]:
        return [refs[0] for refs in self.references]


def template_fields(template: str, flag: str) -> list[str]:
    """The field names a template reads; a malformed template is one line."""
    try:
        names = [field for _, field, _, _ in string.Formatter().parse(template)
                 if field is not None]
    except ValueError as err:
        raise UserError(f"{flag}={template!r} is not a valid template ({err}); write fields "
                        "as {name} and a literal brace as {{ or }}") from None
    if any(name == "" or name.isdigit() for name in names):
        raise UserError(f"{flag}={template!r} has a positional field {{}}; name the field, "
                        "e.g. {prompt}")
    return names


def render(records: Records, prompt_template: str, completion_template: str) -> Completions:
    """Fill the templates for every record (see the module docstring)."""
    prompt_fields = template_fields(prompt_template, "--prompt_template")
    completion_fields = template_fields(completion_template, "--completion_template")
    for flag, names in (("--prompt_template", prompt_fields),
                        ("--completion_template", completion_fields)):
        missing = [n for n in names if n not in records.fields]
        if missing:
            raise UserError(f"{flag} names {', '.join(map(repr, missing))}, which "
                            f"{records.what} does not have; its fields are "
                            f"{', '.join(map(repr, records.fields))}")
    prompts, references = [], []
    for row, where in zip(records.rows, records.where):
        values = {name: _value(records, row, name, where) for name in
                  prompt_fields + completion_fields}
        prompts.append(_fill(prompt_template, "--prompt_template", where,
                             {k: v[0] if isinstance(v, list) and v else v
                              for k, v in values.items()}))
        lists = {n: values[n] for n in completion_fields if isinstance(values[n], list)}
        if not lists:
            references.append([_fill(completion_template, "--completion_template", where,
                                     values)])
            continue
        count = min(len(v) for v in lists.values())
        if count == 0:
            raise UserError(f"{where} has an empty {next(iter(lists))!r}: no completion to "
                            "learn or score; remove the example or fill the field")
        references.append([_fill(completion_template, "--completion_template", where,
                                 {**values, **{n: v[i] for n, v in lists.items()}})
                           for i in range(count)])
    return Completions(records.what, prompts, references, records.where)


def _fill(template: str, flag: str, where: str, values: dict) -> str:
    """The template filled; a conversion or format spec that does not suit
    the value ({x!z}, {x:d} on text) is one line naming the example."""
    try:
        return template.format_map(values)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise UserError(f"{flag}={template!r} cannot be filled from {where} ({err}); write "
                        "plain {name} fields") from None


def _value(records: Records, row: dict, name: str, where: str):
    """A field's value for a template: a ClassLabel id becomes its name."""
    value = row.get(name)
    if value is None:
        raise UserError(f"{where} has no {name!r}; give every example that field")
    names = records.classes.get(name)
    if names is None:
        return value
    if not isinstance(value, int) or not 0 <= value < len(names):
        hint = ("the split is unlabelled (TFDS writes -1 for a missing label); use a split "
                "that has labels, e.g. :validation" if value == -1 else
                f"its classes are 0..{len(names) - 1}")
        raise UserError(f"{where} has {name} {value}; {hint}")
    return names[value]


def read_completions(spec: str, prompt_template: str, completion_template: str,
                     default_split: str, flag: str, tfds_data_dir: str | None = None,
                     tfds_download: bool = False) -> Completions:
    """Examples from a JSONL or CSV file or a `tfds:` split, templates filled."""
    records = read_records(spec, default_split, flag, tfds_data_dir, tfds_download)
    return render(records, prompt_template, completion_template)


@dataclasses.dataclass
class Tokenized:
    """Each example's tokens (EOT, prompt, completion, EOT unless the
    completion was cut), the index of its first completion token; how many
    prompts and completions were cut."""

    tokens: list[np.ndarray]
    starts: list[int]
    prompts_cut: int
    completions_cut: int


def tokenize(examples: Completions, tokenizer, seq_len: int) -> Tokenized:
    """Token ids of every example, cut to fit a window of seq_len + 1 tokens."""
    eot = tokenizer.eot_id
    prompts = tokenizer.encode([p.encode("utf-8") for p in examples.prompts])
    completions = tokenizer.encode([c.encode("utf-8") for c in examples.completions])
    tokens, starts, prompts_cut, completions_cut = [], [], 0, 0
    room = seq_len + 1  # tokens of a window: inputs are the first seq_len
    for prompt, completion in zip(prompts, completions):
        prompt, completion = list(prompt), list(completion)
        end = [eot]
        if len(completion) + 2 > room:  # EOT + completion + EOT cannot fit
            # Its start, after the leading EOT, and no closing EOT: the
            # completion did not end there, so nothing learns to stop there.
            completion, end, completions_cut = completion[:room - 1], [], completions_cut + 1
        keep = room - 1 - len(completion) - len(end)  # prompt tokens that fit
        if len(prompt) > keep:
            prompt, prompts_cut = prompt[len(prompt) - keep:] if keep else [], prompts_cut + 1
        tokens.append(np.asarray([eot, *prompt, *completion, *end], np.int32))
        starts.append(1 + len(prompt))
    return Tokenized(tokens, starts, prompts_cut, completions_cut)


@dataclasses.dataclass
class Windows:
    """Model inputs, [n, seq_len + 1] tokens and [n, seq_len] per input
    position: segment (1.. per example, 0 padding), position in its example,
    weight of its target (1 on completion and closing EOT)."""

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def arrays(self) -> tuple:
        return self.tokens, self.segments, self.positions, self.weights

    @property
    def loss_fraction(self) -> float:
        """Fraction of the input positions whose target carries loss."""
        return float(self.weights.sum() / max(self.weights.size, 1))


def windows(tokenized: Tokenized, seq_len: int, pack: bool, order=None) -> Windows:
    """The examples (in `order`, default as given) one per window, or packed
    next-fit in that order: an example joins the last window if it fits."""
    order = range(len(tokenized.tokens)) if order is None else order
    layout: list[list[int]] = []  # example indices per window
    used: list[int] = []
    for i in order:
        length = len(tokenized.tokens[i])
        if pack and layout and used[-1] + length <= seq_len + 1:
            layout[-1].append(i)
            used[-1] += length
        else:
            layout.append([i])
            used.append(length)
    n = len(layout)
    tokens = np.zeros([n, seq_len + 1], np.int32)
    segments = np.zeros([n, seq_len], np.int32)
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (n, 1))
    weights = np.zeros([n, seq_len], np.float32)
    for w, members in enumerate(layout):
        at = 0
        for segment, i in enumerate(members, 1):
            row, start = tokenized.tokens[i], tokenized.starts[i]
            end = at + len(row)
            tokens[w, at:end] = row
            inputs = slice(at, min(end, seq_len))  # the closing EOT may be a target only
            segments[w, inputs] = segment
            positions[w, inputs] = np.arange(inputs.stop - at, dtype=np.int32)
            # Input j predicts token j + 1: completion tokens start at `start`.
            weights[w, at + start - 1:end - 1] = 1.0
            at = end
    return Windows(tokens, segments, positions, weights)
