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

from . import losses
from .backend import to_numpy
from .padding import pad_batch
from .sampling import generate


@dataclass
class Rollout:
    """A batch of responses with their prompts; ``index[i]`` is the prompt that row i answers.

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
    """A rollout of given responses (token lists) to ``prompts`` (one prompt per response)."""
    if len(prompts) != len(responses):
        raise ValueError(f"from_responses: {len(prompts)} prompts for {len(responses)} responses; expected one each")
    prompt_ids, prompt_mask = pad_batch(prompts, pad_id, side="left")
    tokens, mask = pad_batch(responses, pad_id, side="right")
    index = np.arange(len(prompts)) if index is None else np.asarray(index)
    return Rollout(prompt_ids, prompt_mask, tokens, mask, index)


def response_hidden(model, rollout):
    """The hidden states that predict each response token, (B, N, C): one forward over [prompt | response]."""
    T = rollout.prompt_ids.shape[1]
    ids = np.concatenate([rollout.prompt_ids, rollout.tokens], axis=1)[:, :-1]
    attention = np.concatenate([rollout.prompt_mask, rollout.mask], axis=1)[:, :-1]
    return model.hidden(ids, attention)[:, T - 1:]


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
