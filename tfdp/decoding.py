"""Completions of many prompts: batched, and data-parallel over replicas
and workers.

    prompts -> shards (example i to replica i mod R, over all workers)
    -> each local replica decodes its shard in batches on its own device
       (a plain copy of the weights)
    -> one SUM all-reduce of the [n, max_new_tokens] token table through
       the strategy: every worker holds every completion, in input order

A batch is one compiled shape [batch_size, seq_len]: prompts are
right-padded and keras-hub's cached generation (GPT2CausalLM.generate_step
with its samplers) fills each row from its own end, stopping a row at
end-of-text and the batch when every row has stopped. Rows never mix, so a
completion does not depend on which other prompts share its batch or its
replica: data-parallel decoding gives the texts one replica gives
(tests/test_decoding.py). Beam search decodes one prompt per call (see
`complete`).

A prompt (EOT first, as in training) longer than the window minus
`max_new_tokens` loses its start, as fine-tuning cut it.
"""

from __future__ import annotations

import keras_hub
import numpy as np
import tensorflow as tf

from tfdp.model import build_model


def _encode(tokenizer, prompts: list[str], keep: int) -> list[list[int]]:
    """[EOT] + each prompt's ids, at most `keep` tokens: a longer prompt
    loses its start, after the EOT, as fine-tuning cuts it."""
    ids = tokenizer.encode([p.encode("utf-8") for p in prompts])
    tail = max(keep - 1, 0)
    return [[tokenizer.eot_id] + (list(map(int, row))[-tail:] if tail else []) for row in ids]


def _buffer(longest: int, max_new_tokens: int, seq_len: int) -> int:
    """The batch's width: its longest prompt plus the tokens to generate,
    rounded up to a multiple of 32 (few shapes, few traces), at most the
    window. keras-hub generates until a row's stop token or the end of the
    buffer, so a window-wide buffer would decode far past max_new_tokens."""
    return min(seq_len, -(-(longest + max_new_tokens) // 32) * 32)


def decode(model, prompts: list[list[int]], max_new_tokens: int, step, seq_len: int,
           eot: int, batch_size: int) -> list[list[int]]:
    """Token ids of each prompt's completion (without the EOT that ended it),
    `batch_size` prompts per call of `step` (generation_step of `model`)."""
    filler = 1 if eot == 0 else 0  # keras-hub stops at a stop token in the unmasked part
    out: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        rows = batch + [[eot]] * (batch_size - len(batch))  # one batch size
        width = _buffer(max(len(row) for row in batch), max_new_tokens, seq_len)
        ids = np.full([batch_size, width], filler, np.int32)
        mask = np.zeros([batch_size, width], bool)
        for r, row in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = row, True
        got = step({"token_ids": tf.constant(ids), "padding_mask": tf.constant(mask)})
        tokens, valid = got["token_ids"].numpy(), got["padding_mask"].numpy()
        for r, row in enumerate(batch):
            new = [int(t) for t, ok in zip(tokens[r, len(row):], valid[r, len(row):]) if ok]
            if eot in new:
                new = new[:new.index(eot)]
            out.append(new[:max_new_tokens])
    return out


class Decoder:
    """A plain copy of the model on each local replica's device with its
    generation step, made once (tracing takes seconds) and reused by every
    call: `decoder(weights, prompts, max_new_tokens)` -> completions.

    `cfg` shapes the model; `sampler_fn()` makes one keras-hub sampler per
    replica. All workers call it with the same prompts and get the same
    texts. Within a worker the replicas decode their shares one after
    another, each on its device (Keras builds and traces models unsafely
    across threads): workers decode at the same time, a worker's GPUs in
    turn.
    """

    def __init__(self, strategy, cfg, tokenizer, sampler_fn, batch_size: int = 16):
        from tfdp.generate import generation_step

        self.strategy, self.cfg, self.tokenizer = strategy, cfg, tokenizer
        ids = strategy.experimental_local_results(
            strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(ctx.replica_id_in_sync_group)))
        self.replica_ids = [int(i.numpy()) for i in ids]
        self.devices = list(strategy.extended.worker_devices)
        self.models, self.steps, self.batch_sizes = [], [], []
        for device in self.devices:
            with tf.device(device):
                model = build_model(cfg, tokenizer.vocab_size)
            sampler = sampler_fn()
            self.models.append(model)
            self.steps.append(generation_step(model, sampler, tokenizer.eot_id))
            # keras-hub's BeamSampler couples a batch's rows (every row starts
            # at the shortest prompt's end, and all run until all have
            # stopped, which re-ranks beams that ended): one prompt per call
            # keeps each completion its own.
            beam = isinstance(sampler, keras_hub.samplers.BeamSampler)
            self.batch_sizes.append(1 if beam else batch_size)
        self._gather_fn = None

    def __call__(self, weights, prompts: list[str], max_new_tokens: int) -> list[str]:
        seq_len, eot = self.cfg.seq_len, self.tokenizer.eot_id
        max_new_tokens = max(1, min(max_new_tokens, seq_len - 1))
        encoded = _encode(self.tokenizer, prompts, seq_len - max_new_tokens)
        replicas = self.strategy.num_replicas_in_sync
        tables = {}
        for device, replica, model, step, size in zip(self.devices, self.replica_ids,
                                                      self.models, self.steps,
                                                      self.batch_sizes):
            model.set_weights(weights)
            mine = list(range(replica, len(encoded), replicas))
            with tf.device(device):
                rows = decode(model, [encoded[i] for i in mine], max_new_tokens, step,
                              seq_len, eot, size)
            # Token + 1, so 0 marks "no token" and the tables add up.
            table = np.zeros([len(encoded), max_new_tokens], np.int32)
            for i, row in zip(mine, rows):
                table[i, :len(row)] = np.asarray(row, np.int32) + 1
            tables[replica] = table
        table = tables[self.replica_ids[0]]
        if replicas > 1:  # gather every replica's rows: one all-reduce, TensorFlow's own
            table = self._gather(tables)
        return [self.tokenizer.decode([int(t) - 1 for t in row if t > 0]) for row in table]

    def _gather(self, tables: dict) -> np.ndarray:
        """Every replica's table summed over all replicas and workers. As
        float32 (exact for ids below 2**24), the dtype every collective
        implementation (ring, NCCL) sums."""
        strategy = self.strategy
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(tables[ctx.replica_id_in_sync_group], tf.float32))
        if self._gather_fn is None:  # traced once per table shape
            # tf.identity: a value made on the replica's device; the
            # multi-worker all-reduce takes its destination from it (a
            # captured constant has none: "destinations can not be empty").
            self._gather_fn = tf.function(lambda values: strategy.run(
                lambda v: tf.distribute.get_replica_context().all_reduce(
                    tf.distribute.ReduceOp.SUM, tf.identity(v)), args=(values,)))
        summed = strategy.experimental_local_results(self._gather_fn(values))[0]
        return np.rint(summed.numpy()).astype(np.int64)


def complete(strategy, cfg, weights, tokenizer, prompts: list[str], max_new_tokens: int,
             sampler_fn, batch_size: int = 16) -> list[str]:
    """The completion of every prompt, in order, by a one-off Decoder."""
    return Decoder(strategy, cfg, tokenizer, sampler_fn, batch_size)(weights, prompts,
                                                                      max_new_tokens)


def complete_file(model_dir: str, input_spec: str, output: str, prompt_template: str,
                  max_new_tokens: int, sampler_fn, batch_size: int, strategy,
                  log=print, tfds_data_dir: str | None = None,
                  tfds_download: bool = False) -> int:
    """tfdp-generate --input: every record of `input_spec` (JSONL, CSV or a
    TFDS split, default split test) completed by the newest readable
    checkpoint of `model_dir`, written to the JSONL file `output` as the
    record, nested as the source nests it, plus "generated" (a
    "completion" it has, the reference, stays),
    in input order, atomically (the chief writes it). `sampler_fn(vocab
    size)` makes a sampler. Returns the count."""
    import dataclasses
    import json
    import os

    from tfdp.atomic import write_text
    from tfdp.completiondata import render
    from tfdp.errors import UserError
    from tfdp.records import read_records
    from tfdp.restore import load_run, restore_weights
    from tfdp.strategy import is_chief

    output = os.path.abspath(os.path.expanduser(output))
    if os.path.lexists(output):
        raise UserError(f"--output={output} exists; choose a new file (nothing is overwritten)")
    if not os.path.isdir(os.path.dirname(output)):
        raise UserError(f"--output={output}: its directory does not exist; create it first")
    cfg, tokenizer, model_dir = load_run(model_dir)
    records = read_records(input_spec, "test", "--input", tfds_data_dir, tfds_download)
    prompts = render(records, prompt_template, "").prompts
    plain = dataclasses.replace(cfg, mixed_precision="off")
    model = build_model(plain, tokenizer.vocab_size)
    checkpoint = restore_weights(model, model_dir)
    texts = complete(strategy, plain, model.get_weights(), tokenizer, prompts, max_new_tokens,
                     lambda: sampler_fn(tokenizer.vocab_size), batch_size)
    if is_chief(strategy):
        write_text(output, "".join(json.dumps({**row, "generated": text}, ensure_ascii=False)
                                   + "\n" for row, text in zip(records.source_rows, texts)))
        log(f"wrote {len(texts):,} completions of {records.what} to {output} ({checkpoint}, "
            f"{strategy.num_replicas_in_sync} replica(s))")
    return len(texts)
