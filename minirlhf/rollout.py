"""A rollout: sampled responses kept next to the prompts they answer, and log π of them under a model.

Every policy-gradient trainer (PPO, GRPO, RLOO), DPO's pairs and the evaluation pass a ``Rollout``,
which holds a batch in two blocks:

    prompt_ids (B, T)   left-padded,  prompt_mask (B, T)   1 on real prompt tokens
    tokens     (B, N)   right-padded, mask        (B, N)   1 up to and including <|im_end|>

so the model reads ``[prompt | response]`` and the hidden state at column T−1+t predicts response
token t:

    log π(y_t | x, y_<t) = log_softmax(W h_{T−1+t} / τ)[y_t]          (W the LM head, τ the temperature)

The temperature τ is the one the responses were sampled at: the sampler draws from softmax(ℓ/τ),
so the trainer's log-probs (and the ratios π/π_old built from them) must divide by the same τ
(forgetting it is a known bug class of RLHF trainers; see tests/test_rollout.py).
"""
from dataclasses import dataclass, replace

import numpy as np

from . import backend, functional as F, losses
from .backend import to_numpy
from .model import PrefixCache
from .padding import pad_batch
from .sampling import generate


@dataclass
class Rollout:
    """A batch of responses with their prompts; ``index[i]`` is the prompt that row i answers (rows
    with equal index hold the same prompt, which :func:`response_hidden` computes once for all of them).

    logprobs (B, N): what the sampler reported, log π_old(y_t) at ``temperature`` (None when the
    responses were not sampled, e.g. preference pairs); temperature: the one log-probs use (a
    greedy rollout, temperature 0, is scored at 1).
    """
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    index: np.ndarray
    logprobs: np.ndarray = None
    temperature: float = 1.0

    def __len__(self):
        return len(self.index)

    def responses(self):
        """Each row's response tokens (up to and including <|im_end|>) as a list."""
        return [row[m > 0].tolist() for row, m in zip(to_numpy(self.tokens), to_numpy(self.mask))]

    def lengths(self):
        """Tokens in each response, (B,)."""
        return self.mask.sum(axis=1)

    def rows(self, picked):
        """The rollout of rows ``picked`` (an index array or a slice)."""
        logprobs = None if self.logprobs is None else self.logprobs[picked]
        return replace(self, prompt_ids=self.prompt_ids[picked], prompt_mask=self.prompt_mask[picked],
                       tokens=self.tokens[picked], mask=self.mask[picked], index=self.index[picked],
                       logprobs=logprobs)


def sample(model, prompts, index, samples_per_prompt, temperature, max_new_tokens, eos_id, pad_id, seed):
    """Sample ``samples_per_prompt`` responses for each of ``prompts[index]``, grouped in consecutive rows."""
    index = np.repeat(np.asarray(index), samples_per_prompt)
    out = generate(model, [prompts[i] for i in index], max_new_tokens, temperature=temperature,
                   eos_id=eos_id, pad_id=pad_id, seed=seed)
    return Rollout(out.prompt_ids, out.prompt_mask, out.tokens, out.mask, index, out.logprobs,
                   temperature if temperature > 0 else 1.0)


def from_responses(prompts, responses, pad_id, index=None):
    """A rollout of given responses (token lists) to ``prompts`` (one prompt per response).

    ``index``: the prompt each row answers; by default equal prompts get the same index (the first row
    that holds it), so a prompt answered several times is computed once.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"from_responses: {len(prompts)} prompts for {len(responses)} responses; expected one each")
    prompt_ids, prompt_mask = pad_batch(prompts, pad_id, side="left")
    tokens, mask = pad_batch(responses, pad_id, side="right")
    if index is None:
        first_row = {}
        index = np.array([first_row.setdefault(tuple(p), i) for i, p in enumerate(prompts)], dtype=np.int64)
    return Rollout(prompt_ids, prompt_mask, tokens, mask, np.asarray(index))


def from_pairs(pairs, pad_id):
    """Chosen rows then rejected rows of (prompt, chosen, rejected) token triples, as one rollout
    (row i and row B + i share their prompt)."""
    prompts = [p for p, _, _ in pairs]
    return from_responses(prompts * 2, [c for _, c, _ in pairs] + [r for _, _, r in pairs], pad_id,
                          index=np.tile(np.arange(len(pairs)), 2))


def shared_prompts(rollout):
    """(first, rows): the first row holding each distinct prompt (by ``index``), and for every row the
    position of its prompt in ``first``, so that ``prompt_ids[first][rows]`` is ``prompt_ids``."""
    _, first, rows = np.unique(to_numpy(rollout.index), return_index=True, return_inverse=True)
    rows = rows.reshape(-1)
    if isinstance(rollout.prompt_ids, np.ndarray):  # on CuPy the check would wait for the GPU
        for name in ("prompt_ids", "prompt_mask"):
            held = getattr(rollout, name)
            if not np.array_equal(held[first][rows], held):
                raise ValueError(f"Rollout: rows with the same index hold different {name}; index[i] must name "
                                 "the prompt that row i answers")
    return first, rows


def response_hidden(model, rollout, last=False):
    """The hidden states that predict each response token, (B, N, C): the states on columns T−1 … T+N−2
    of [prompt | response]. With ``last``, (B, N + 1, C): also the state on the last column, T+N−1.

    Rows that answer the same prompt (equal ``index``: a GRPO group, a preference pair) share it: the
    U distinct prompts go through the model once, and each response attends to its prompt's keys and
    values (:class:`~minirlhf.model.PrefixCache`), exact since attention is causal. The work falls
    from B·(T+N) to U·T + B·N token positions. A batch of distinct prompts is one forward. Either way
    the last block runs its queries, attention and MLP only on the columns whose states are returned
    (``model.hidden(..., last=...)``): the others' outputs there would be dropped.
    """
    T = rollout.prompt_ids.shape[1]
    tokens, mask = (rollout.tokens, rollout.mask) if last else (rollout.tokens[:, :-1], rollout.mask[:, :-1])
    first, rows = shared_prompts(rollout)
    if len(first) == len(rows):
        ids = np.concatenate([rollout.prompt_ids, tokens], axis=1)
        attention = np.concatenate([rollout.prompt_mask, mask], axis=1)
        return model.hidden(ids, attention, last=ids.shape[1] - (T - 1))
    cache = PrefixCache(rows)
    on = backend.device_of(rollout.prompt_ids)
    picked = backend.to_device(first, on)
    prompt_last = model.hidden(rollout.prompt_ids[picked], rollout.prompt_mask[picked], cache=cache, last=1)
    if tokens.shape[1] == 0:
        return prompt_last[cache.rows]
    h = model.hidden(tokens, np.concatenate([rollout.prompt_mask, mask], axis=1), cache=cache)
    return F.cat([prompt_last[cache.rows], h], axis=1)


def response_logits(model, rollout, hidden=None):
    """Logits (B, N, V) that score each response token, divided by the rollout's temperature.

    Only the N response columns go through the LM head: the prompt's logits are never needed.
    ``hidden``: the states of :func:`response_hidden`, when the caller already has them.
    """
    logits = model.lm_logits(response_hidden(model, rollout) if hidden is None else hidden)
    return logits if rollout.temperature == 1 else logits / rollout.temperature


def response_logprobs(model, rollout, values=False, entropy=False):
    """log π(y_t | x, y_<t) of every response token, (B, N) with gradient, 0 under the mask.

    From the same forward pass, on request: ``values`` V(s_t) (B, N) from the value head, and
    ``entropy`` the mean entropy of π(·| x, y_<t) over the response tokens (0-d, detached; TRL's
    ``entropy`` metric). Returns logp alone, or (logp, values), (logp, entropy), (logp, values, entropy).
    """
    h = response_hidden(model, rollout)
    logits = response_logits(model, rollout, h)
    out = (losses.masked_token_logprobs(logits, rollout.tokens, rollout.mask),)
    if values:
        out += (model.values(h),)
    if entropy:
        out += (losses.entropy(logits.detach(), rollout.mask).data,)
    return out if len(out) > 1 else out[0]


def sequence_logprobs(model, rollout):
    """log π(y | x) = Σ_t log π(y_t | x, y_<t) of each response, (B,)."""
    return losses.sequence_logprobs(response_logits(model, rollout), rollout.tokens, rollout.mask)
