"""Addition with optional working: "What is 12+34?" answered "46", "12+34=46" or "12+34 12+34=46".

The answer is the number after the last "=" (the whole response when there is none), so the working in
front of it can be any length without changing whether the response is right:

    r(x, y) = 1  if parse(answer part of y) == a + b,  else 0.

A response's length is then free to drift under RL, which is what the length experiment of the lab
watches (minirlhf/lab/length.py). Demonstrations restate the sum 0 to ``max_working`` times before the
answer, uniformly, so the SFT model starts with a spread of lengths.
"""
import numpy as np

from .arithmetic import parse_answer
from .environment import AdditionEnvironment
from .preferences import gold_score


def final_answer(text):
    """The part of a response that states the answer: after the last "=", or all of it."""
    return text.rsplit("=", 1)[-1]


def working_reward(response, problem):
    """1.0 if the number after the last "=" (or the whole response) is the right sum, else 0.0."""
    return 1.0 if parse_answer(final_answer(response)) == problem.answer else 0.0


def working_gold_score(response, problem):
    """The hidden rater's score (tasks/preferences.py) of the answer part."""
    return gold_score(final_answer(response), problem)


def worked_answer(problem, repeats):
    """``repeats`` restatements of the sum, then "=" and the answer ("46" alone for 0)."""
    if repeats == 0:
        return str(problem.answer)
    return " ".join([f"{problem.a}+{problem.b}"] * repeats) + f"={problem.answer}"


class WorkingEnvironment(AdditionEnvironment):
    """The addition environment whose responses may carry working before the answer."""

    def __init__(self, config, seed, max_working=2):
        super().__init__(config, seed)
        if not isinstance(max_working, int) or max_working < 0:
            raise ValueError(f"max_working: must be a non-negative integer, got {max_working!r}")
        self.max_working = max_working
        digits = config.digits
        # each restatement is "a+b " (2·digits + 2 tokens), then "=", the answer and <|im_end|>
        self.max_new_tokens = max_working * (2 * digits + 2) + digits + 3 + 2

    def rule_reward(self, split="train"):
        return self.scorer(self.train if split == "train" else self.heldout, working_reward)

    def gold_score(self, split="train"):
        return self.scorer(self.train if split == "train" else self.heldout, working_gold_score)

    def demonstrations(self, n, seed):
        rng = np.random.default_rng([seed, 2])
        problems = self.task.train_problems(n, rng)
        repeats = rng.integers(0, self.max_working + 1, size=n)
        return [(self.task.prompt_ids(self.tokenizer, p), self.task.answer_ids(self.tokenizer, worked_answer(p, int(k))))
                for p, k in zip(problems, repeats)]


