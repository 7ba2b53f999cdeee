"""Preferences from a hidden rater: pairs of answers labelled through the Bradley-Terry model.

A hidden *gold* score grades each answer to an addition problem:

    g(y) = 1                              if y states the right sum,
         = 0.1 + 0.4 · (matching digits) / n   if y states a wrong number (digits aligned from the right,
                                               n the longer length, so a wrong length costs too),
         = 0                               if y states no number.

The rater prefers y_1 over y_2 with the Bradley-Terry probability (Bradley & Terry 1952; the RLHF
reward-model lectures)

    P(y_1 ≻ y_2) = σ((g(y_1) − g(y_2)) / temperature),

so labels are noisy, as human ones are: near-ties are close to coin flips. The gold score never
enters training; it only grades the reward model (pair accuracy against the gold order) and the
policies (mean gold score of their samples).
"""
import math
from dataclasses import dataclass

from .arithmetic import parse_answer


def gold_score(response, problem):
    """The hidden rater's score g(y) in [0, 1] (see the module docstring)."""
    value = parse_answer(response)
    if value is None:
        return 0.0
    if value == problem.answer:
        return 1.0
    truth, said = str(problem.answer), str(value)
    n = max(len(truth), len(said))
    matching = sum(t == s for t, s in zip(truth.rjust(n), said.rjust(n)))
    return 0.1 + 0.4 * matching / n


def bradley_terry_probability(g1, g2, temperature):
    """P(y_1 ≻ y_2) = σ((g_1 − g_2) / temperature)."""
    z = (g1 - g2) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: the rater chose ``chosen`` over ``rejected`` (the gold scores stay hidden
    from training; ``gold_chosen > gold_rejected`` says whether the noisy label agrees with the gold order)."""
    problem: object
    chosen: str
    rejected: str
    gold_chosen: float
    gold_rejected: float


def perturbations(answer, rng):
    """Wrong answers near ``answer``: one digit changed, off by ±1 / ±10 / ±100, a digit dropped or doubled."""
    s = str(answer)
    out = set()
    i = int(rng.integers(len(s)))
    out.add(s[:i] + str((int(s[i]) + int(rng.integers(1, 10))) % 10) + s[i + 1:])
    for step in (1, 10, 100):
        out.add(str(answer + step * (1 if rng.random() < 0.5 else -1)))
    j = int(rng.integers(len(s)))
    out.add(s[:j] + s[j + 1:] if len(s) > 1 else s + s)
    out.add(s[:j] + s[j] + s[j:])
    out.discard(s)
    return sorted(w for w in out if w and not w.startswith("-") and not (len(w) > 1 and w.startswith("0")))


def label_pairs(problem, candidates, n_pairs, rng, temperature=0.1):
    """``n_pairs`` comparisons between distinct ``candidates`` (answer texts) of one problem with different
    gold scores, each labelled by one Bradley-Terry draw of the hidden rater."""
    if temperature <= 0:
        raise ValueError(f"label_pairs: temperature must be > 0, got {temperature}")
    unique = sorted(set(candidates))
    scores = {c: gold_score(c, problem) for c in unique}
    options = [(x, y) for i, x in enumerate(unique) for y in unique[i + 1:] if scores[x] != scores[y]]
    if not options:
        return []
    pairs = []
    for k in rng.permutation(len(options))[:n_pairs]:
        x, y = options[k]
        if rng.random() >= bradley_terry_probability(scores[x], scores[y], temperature):
            x, y = y, x
        pairs.append(PreferencePair(problem, x, y, scores[x], scores[y]))
    return pairs
