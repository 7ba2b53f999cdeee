"""generate: sample continuations of a batch of left-padded prompts, one token per step, with a KV cache.

Each step turns the last position's logits ℓ (B, V) into a token:

    greedy (temperature = 0):  y = argmax ℓ
    otherwise:                 z = ℓ / temperature, then
        top-k:  keep the k largest z,
        top-p:  keep the smallest set of largest z whose softmax mass (after top-k) reaches p
                (Holtzman et al. 2020, "nucleus sampling"),
        y ~ softmax(z over the kept tokens), drawn as argmax(z + Gumbel noise) on the device.

Rows stop independently at ``eos_id``: after a row's eos it receives ``pad_id`` with
mask 0, and the loop ends once every row is done.
"""
import math
from dataclasses import dataclass

import numpy as np

from . import backend
from .padding import pad_batch
from .tensor import no_grad


# rows in one forward pass: bounds the activations of a large batch (the demo samples 24,000 preference-pair
# rows at once: 2.0 GB at the peak in one pass, 0.7 GB in blocks of 4096, most of it the KV caches, one per block)
ROWS_PER_FORWARD = 4096


@dataclass
class Generation:
    """What :func:`generate` returns; arrays live on the model's device (numpy or cupy).

    tokens     (B, N) int64    the new tokens; ``pad_id`` after a row's eos
    mask       (B, N) float32  1 up to and including each row's eos, 0 after
    logprobs   (B, N) float32  log π(y_t | x, y_<t) of each sampled token under the
                               unfiltered policy at the sampling temperature:
                               log_softmax(ℓ / temperature)[y_t] — top-k/top-p are not
                               applied here; with temperature 0, log_softmax(ℓ)[y_t]
                               (temperature 1). 0 where mask is 0.
    prompt_ids (B, T) int64    the left-padded prompts that were continued
    prompt_mask (B, T) float32 1 on their real tokens
    N is the number of steps taken: max_new_tokens, or fewer if every row hit eos.
    """
    tokens: object
    mask: object
    logprobs: object
    prompt_ids: object
    prompt_mask: object


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             eos_id=None, seed=0, attention_mask=None, pad_id=0):
    """Sample up to ``max_new_tokens`` tokens after each prompt (see the module docstring).

    ``prompt_ids``: a list of token lists (left-padded here with ``pad_id``), or a (B, T)
    integer array with ``attention_mask`` (B, T) (all ones if omitted). The same ``seed``
    gives the same output; a list of B seeds gives each row its own generator, so a row's
    sample does not depend on which rows share its batch (data-parallel ranks sample their
    share of a batch exactly as one process samples all of it). Runs under ``no_grad`` with
    the model in eval mode.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    xp = model.wte.weight.xp
    ids, mask = _prompt_batch(prompt_ids, attention_mask, pad_id)
    ids, mask = xp.asarray(ids), xp.asarray(mask, dtype=np.float32)
    B, T = ids.shape
    N = max_new_tokens
    if T + N > model.config.block_size:
        raise ValueError(f"generate: prompt length {T} + max_new_tokens {N} exceeds the model's "
                         f"block_size={model.config.block_size}")
    if not 0 <= pad_id < model.config.vocab_size:
        raise ValueError(f"generate: pad_id must be a token id in [0, vocab_size={model.config.vocab_size}) "
                         f"(finished rows are fed it), got {pad_id}")
    if np.ndim(seed) == 0:
        rng = xp.random.default_rng(seed)
    elif len(seed) == B:
        rng = [xp.random.default_rng(int(s)) for s in seed]
    else:
        raise ValueError(f"generate: seed must be an int or one int per row ({B}), got {len(seed)} seeds")
    full_mask = xp.zeros((B, T + N), dtype=np.float32)  # prompt then generated columns
    full_mask[:, :T] = mask
    tokens = xp.full((B, N), pad_id, dtype=np.int64)
    logprobs = xp.zeros((B, N), dtype=np.float32)
    done = xp.zeros(B, dtype=bool)
    # each early-stop check reads one flag back from the GPU, so there check every 8 steps
    check_every = 1 if xp is np else 8
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            blocks = [slice(start, start + ROWS_PER_FORWARD) for start in range(0, B, ROWS_PER_FORWARD)]
            caches = [model.new_cache() for _ in blocks]
            for cache in caches:
                cache.max_len = T + N  # else its doubling grows it to block_size, past any position sampled here
            logits = xp.empty((B, model.config.vocab_size), dtype=model.wte.weight.dtype)  # (B, V), every step

            def next_logits(new_ids, length):
                for rows, cache in zip(blocks, caches):
                    logits[rows] = next_token_logits(model, new_ids[rows], full_mask[rows, :length], cache)

            for rows, cache in zip(blocks, caches):
                logits[rows] = prefill(model, ids[rows], mask[rows], cache)
            for t in range(N):
                y, logp = _sample(logits, temperature, top_k, top_p, rng, xp)
                active = ~done
                tokens[:, t] = xp.where(active, y, pad_id)
                logprobs[:, t] = xp.where(active, logp, 0)
                full_mask[:, T + t] = active
                if eos_id is not None:
                    done |= active & (y == eos_id)
                    if (t + 1) % check_every == 0 and bool(done.all()):
                        break
                if t + 1 < N:
                    next_logits(tokens[:, t:t + 1], T + t + 1)
    finally:
        model.train(was_training)
    out_mask = full_mask[:, T:]
    n = int(out_mask.sum(axis=1).max())  # steps until the last row finished
    return Generation(tokens[:, :n], out_mask[:, :n].copy(), logprobs[:, :n], ids, mask)


def prefill(model, ids, mask, cache):
    """next_token_logits of the prompts ``ids`` (B, T), each distinct prompt run once.

    A group of samples repeats its prompt (GRPO's 8 per prompt, the preference pairs' 8): the
    forward runs on the distinct rows, and the cache and logits are copied out to every row. Rows
    are independent in the forward, so this changes nothing but the work (GRPO's 4-layer step:
    the rollout's prompt pass on 16 rows instead of 128). On CuPy every row runs.
    """
    if backend.is_cupy_array(ids):
        return next_token_logits(model, ids, mask, cache)
    rows = np.concatenate([ids, mask.astype(ids.dtype)], axis=1)
    _, first, copies = np.unique(rows, axis=0, return_index=True, return_inverse=True)  # row i = distinct copies[i]
    if len(first) == len(ids):
        return next_token_logits(model, ids, mask, cache)
    copies = copies.reshape(-1)
    logits = next_token_logits(model, ids[first], mask[first], cache)
    for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
        if k is not None:
            cache.keys[layer], cache.values[layer] = k[copies], v[copies]
    return logits[copies]


def next_token_logits(model, ids, attention_mask, cache):
    """The logits (B, V) of the token after each row of ``ids`` (B, T), extending ``cache``.

    Only the last position goes through the LM head: for a prompt of T tokens the (B, T, V) logits
    of the others would be computed and dropped (with the pair sampling's 24,000 prompts, 0.5 GB); and
    only its state comes out of the last block (``last=1``), whose other positions matter only as the
    keys and values it writes to the cache.
    """
    return model.lm_logits(model.hidden(ids, attention_mask, cache=cache, last=1)[:, -1]).data


def _sample(logits, temperature, top_k, top_p, rng, xp):
    """One token per row from logits (B, V), and its log-prob (see :class:`Generation`)."""
    if temperature == 0:
        y = xp.argmax(logits, axis=-1)
        return y, _log_softmax_at(logits, y, xp)
    z = logits / np.float32(temperature)
    if isinstance(rng, list):
        u = xp.stack([r.random(z.shape[1], dtype=np.float32) for r in rng])
    else:
        u = rng.random(z.shape, dtype=np.float32)
    gumbel = -xp.log(-xp.log(xp.maximum(u, np.float32(1e-20))))
    y = xp.argmax(_filter(z, top_k, top_p, xp) + gumbel, axis=-1)
    return y, _log_softmax_at(z, y, xp)


def _filter(z, top_k, top_p, xp):
    """z with −inf outside the top-k, then outside the top-p nucleus of what is left."""
    if top_k is None and top_p is None:
        return z
    ranked = -xp.sort(-z, axis=-1)  # (B, V), descending
    if top_k is not None and top_k < z.shape[-1]:
        ranked[:, top_k:] = -np.inf
    keep = z.shape[-1] if top_k is None else min(top_k, z.shape[-1])
    keep = xp.full((z.shape[0],), keep)
    if top_p is not None and top_p < 1:
        p = xp.exp(ranked - ranked[:, :1])
        p /= p.sum(axis=-1, keepdims=True)
        mass_before = xp.cumsum(p, axis=-1) - p
        keep = xp.clip((mass_before < top_p).sum(axis=-1), 1, keep)
    threshold = ranked[xp.arange(z.shape[0]), keep - 1][:, None]
    return xp.where(z >= threshold, z, -np.inf)


def _log_softmax_at(z, y, xp):
    """log softmax(z)[y] as (z_y − m) − log Σ exp(z − m): subtracting m first keeps huge logits exact."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return xp.take_along_axis(shifted, y[:, None], axis=-1)[:, 0] - xp.log(xp.exp(shifted).sum(axis=-1))


def _prompt_batch(prompt_ids, attention_mask, pad_id):
    if isinstance(prompt_ids, (list, tuple)) and (not prompt_ids or not np.isscalar(prompt_ids[0])):
        if attention_mask is not None:
            raise ValueError("generate: attention_mask is only for a padded (B, T) array; "
                             "lists of prompts are padded here")
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        return pad_batch(prompt_ids, pad_id, side="left")
    ids = prompt_ids.data if hasattr(prompt_ids, "requires_grad") else prompt_ids
    if not (isinstance(ids, np.ndarray) or backend.is_cupy_array(ids)):
        ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"generate: prompt_ids must be a list of token lists or a (B, T) integer array, "
                         f"got shape {ids.shape} dtype {ids.dtype}")
    if attention_mask is None:
        return ids, np.ones(ids.shape, dtype=np.float32)
    mask = backend.array_of(attention_mask)
    if tuple(mask.shape) != ids.shape:
        raise ValueError(f"generate: attention_mask has shape {tuple(mask.shape)}, prompt_ids {ids.shape}")
    real = backend.to_numpy(mask) != 0
    if not real.any(axis=1).all():
        raise ValueError("generate: every prompt needs at least one real token (a 1 in attention_mask)")
    if (np.diff(real.astype(np.int8), axis=1) < 0).any():
        raise ValueError("generate: prompts must be left-padded (each row's real tokens last, pads first): a "
                         "right-padded row would be continued after its pads")
    return ids, mask


def _check_args(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p}")
