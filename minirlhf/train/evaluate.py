"""Held-out evaluation of a policy, the same for every stage (and for the demo's table).

    accuracy         pass@1: mean rule reward of ``samples`` samples per prompt at temperature 1
    greedy_accuracy  rule reward of the greedy answer
    gold_reward      mean hidden gold score of the temperature-1 samples
    kl_to_sft        KL(π ‖ π_ref) per response, Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)): exact over the
                     vocabulary at each step (losses.kl_exact), summed over the response, averaged over the
                     temperature-1 samples (so Monte Carlo only over which responses are sampled)
"""
import numpy as np

from .. import losses
from ..rollout import response_logits, sample
from ..tensor import no_grad


def evaluate_policy(policy, reference, prompts, reward_fn, gold_fn, eos_id, pad_id, max_new_tokens, samples=4,
                    seed=0):
    """The held-out metrics above, on ``prompts`` (which training never sees)."""
    index = np.arange(len(prompts))
    sampled = sample(policy, prompts, index, samples, 1.0, max_new_tokens, eos_id, pad_id, seed)
    greedy = sample(policy, prompts, index, 1, 0.0, max_new_tokens, eos_id, pad_id, seed)
    return {"accuracy": float(np.mean(reward_fn(sampled.index, sampled.responses()))),
            "greedy_accuracy": float(np.mean(reward_fn(greedy.index, greedy.responses()))),
            "gold_reward": float(np.mean(gold_fn(sampled.index, sampled.responses()))),
            "kl_to_sft": kl_to_reference(policy, reference, sampled)}


def kl_to_reference(policy, reference, rollout, rows=512):
    """Mean over responses of Σ_t exact KL(π ‖ π_ref) at each response position."""
    if policy is reference:
        return 0.0
    total = 0.0
    with no_grad():
        for start in range(0, len(rollout), rows):
            part = rollout.rows(slice(start, start + rows))
            per_token = losses.kl_exact(response_logits(policy, part), response_logits(reference, part).data,
                                        part.mask)
            total += float(per_token.data.sum())
    return total / len(rollout)
