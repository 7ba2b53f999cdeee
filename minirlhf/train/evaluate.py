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
from ..distributed import share, world
from ..rollout import response_logits, sample
from ..tensor import no_grad
from .run import EVALUATION, row_seeds


def evaluate_policy(policy, reference, prompts, reward_fn, gold_fn, eos_id, pad_id, max_new_tokens, samples=4,
                    seed=0):
    """The held-out metrics above, on ``prompts`` (which training never sees).

    Sample k of prompt j draws from (seed, j, k); data parallel, each rank evaluates its share of the
    prompts and the sums are added over ranks, so N ranks report what one process reports.
    """
    ranks = world()
    index = np.arange(len(prompts))[share(len(prompts), ranks.size, ranks.rank)]
    sums = np.zeros(4)  # Σ rule reward of samples, Σ rule reward of greedy answers, Σ gold, Σ KL
    if len(index):
        seeds = row_seeds((seed, EVALUATION), index, samples)
        sampled = sample(policy, prompts, index, samples, 1.0, max_new_tokens, eos_id, pad_id, seeds)
        greedy = sample(policy, prompts, index, 1, 0.0, max_new_tokens, eos_id, pad_id, seeds[::samples])
        sums[:] = (np.sum(reward_fn(sampled.index, sampled.responses())),
                   np.sum(reward_fn(greedy.index, greedy.responses())),
                   np.sum(gold_fn(sampled.index, sampled.responses())),
                   kl_to_reference(policy, reference, sampled) * len(sampled))
    accuracy, greedy_accuracy, gold_reward, kl = ranks.sum(sums) / (len(prompts) * np.array([samples, 1, samples,
                                                                                            samples]))
    return {"accuracy": float(accuracy), "greedy_accuracy": float(greedy_accuracy), "gold_reward": float(gold_reward),
            "kl_to_sft": float(kl)}


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
