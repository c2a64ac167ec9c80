"""Completions of many prompts: batched, and data-parallel over replicas
and workers.

    prompts -> shards (example i to replica i mod R, over all workers)
    -> each local replica decodes its shard in batches on its own device
       (a plain copy of the weights; threads, so GPUs decode at once)
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

import threading

import keras_hub
import numpy as np
import tensorflow as tf

from tfdp.model import build_model


def _encode(tokenizer, prompts: list[str], keep: int) -> list[list[int]]:
    """[EOT] + each prompt's ids, the last `keep` of them."""
    ids = tokenizer.encode([p.encode("utf-8") for p in prompts])
    return [([tokenizer.eot_id] + list(map(int, row)))[-keep:] for row in ids]


def decode(model, prompts: list[list[int]], max_new_tokens: int, step, seq_len: int,
           eot: int, batch_size: int) -> list[list[int]]:
    """Token ids of each prompt's completion (without the EOT that ended it),
    `batch_size` prompts per call of `step` (generation_step of `model`)."""
    filler = 1 if eot == 0 else 0  # keras-hub stops at a stop token in the unmasked part
    out: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        rows = batch + [[eot]] * (batch_size - len(batch))  # one compiled shape
        ids = np.full([batch_size, seq_len], filler, np.int32)
        mask = np.zeros([batch_size, seq_len], bool)
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


def complete(strategy, cfg, weights, tokenizer, prompts: list[str], max_new_tokens: int,
             sampler_fn, batch_size: int = 16) -> list[str]:
    """The completion of every prompt, in order, decoded data-parallel over
    `strategy`'s replicas (all workers call this with the same prompts and
    get the same texts). `cfg` shapes the model, `weights` are its
    get_weights(); `sampler_fn()` makes one keras-hub sampler per replica."""
    from tfdp.generate import generation_step

    seq_len, eot = cfg.seq_len, tokenizer.eot_id
    max_new_tokens = max(1, min(max_new_tokens, seq_len - 1))
    encoded = _encode(tokenizer, prompts, seq_len - max_new_tokens)
    devices = list(strategy.extended.worker_devices)
    ids = strategy.experimental_local_results(
        strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(ctx.replica_id_in_sync_group)))
    replica_ids = [int(i.numpy()) for i in ids]
    replicas = strategy.num_replicas_in_sync
    tables: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(device: str, replica: int) -> None:
        try:
            with tf.device(device):
                model = build_model(cfg, tokenizer.vocab_size)
                model.set_weights(weights)
                sampler = sampler_fn()
                step = generation_step(model, sampler, eot)
                mine = list(range(replica, len(encoded), replicas))
                # keras-hub's BeamSampler couples a batch's rows (every row
                # starts at the shortest prompt's end, and all run until all
                # have stopped, which re-ranks beams that ended): one prompt
                # per call keeps each completion its own.
                size = 1 if isinstance(sampler, keras_hub.samplers.BeamSampler) else batch_size
                texts = decode(model, [encoded[i] for i in mine], max_new_tokens, step,
                               seq_len, eot, size)
            # Token + 1, so 0 marks "no token" and the tables add up.
            table = np.zeros([len(encoded), max_new_tokens], np.int32)
            for i, row in zip(mine, texts):
                table[i, :len(row)] = np.asarray(row, np.int32) + 1
            tables[replica] = table
        except BaseException as err:  # noqa: BLE001 (re-raised in the caller)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(d, r)) for d, r in zip(devices, replica_ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    table = tables[replica_ids[0]]
    if replicas > 1:  # gather every replica's rows: one all-reduce, TensorFlow's own
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(tables[ctx.replica_id_in_sync_group]))

        @tf.function
        def gather(values):
            return strategy.run(lambda v: tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, v), args=(values,))
        table = strategy.experimental_local_results(gather(values))[0].numpy()
    return [tokenizer.decode([int(t) - 1 for t in row if t > 0]) for row in table]

