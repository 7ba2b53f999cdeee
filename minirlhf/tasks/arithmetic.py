"""Addition with a verifiable reward: "What is 347+589?" answered "936".

The lectures' example of a task whose reward needs no human: a rule checks the
answer (as Math-Verify does for maths). The reward is

    r(x, y) = 1  if parse(y) == a + b,  else 0,

where ``parse`` is lenient about form (surrounding whitespace, a trailing
period, ``\\boxed{936}``, thousands commas) but not about the number.

Prompts are split into train and held-out sets *by operands*: a held-out pair
(a, b) never appears in training, in either order, so held-out accuracy
measures generalisation, not recall.
"""
import re
from dataclasses import dataclass

import numpy as np

from ..tokenizer import BPETokenizer, SPECIAL_TOKENS, render_chat


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self):
        return self.a + self.b

    @property
    def question(self):
        return f"What is {self.a}+{self.b}?"

    def messages(self):
        return [{"role": "user", "content": self.question}]


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[+-]?\d{1,3}(,\d{3})+|[+-]?\d+")


def parse_answer(text):
    """The integer a response states, or None if it states none.

    Accepts "936", " 936 ", "936.", "\\boxed{936}", "The answer is \\boxed{936}." and "1,234";
    rejects "93 6", "936 or 937", "nine hundred" and "".
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_answer: text must be a str, got {type(text).__name__}")
    boxed = _BOXED.findall(text)
    s = boxed[-1] if boxed else text
    s = s.strip().rstrip(".").strip()
    if not _NUMBER.fullmatch(s):
        return None
    return int(s.replace(",", ""))


def rule_reward(response, problem):
    """1.0 if the response states the right sum, else 0.0 (the verifiable reward)."""
    return 1.0 if parse_answer(response) == problem.answer else 0.0


class AdditionTask:
    """Sums of two ``digits``-digit numbers, with a fixed held-out set of ``n_heldout`` operand pairs.

    ``train_problems(n, rng)`` draws training problems that are never held out (in either order);
    ``heldout`` is the fixed list of held-out problems.
    """

    def __init__(self, digits=3, n_heldout=200, seed=0):
        if not isinstance(digits, int) or digits < 1:
            raise ValueError(f"AdditionTask: digits must be a positive integer, got {digits!r}")
        self.digits = digits
        self.low, self.high = (10 ** (digits - 1) if digits > 1 else 0), 10 ** digits  # operands in [low, high)
        n_pairs = (self.high - self.low) ** 2
        if not isinstance(n_heldout, int) or not 0 < n_heldout <= n_pairs // 4:
            raise ValueError(f"AdditionTask: n_heldout must be in [1, {n_pairs // 4}] for {digits}-digit "
                             f"operands, got {n_heldout!r}")
        rng = np.random.default_rng([seed, digits, 7919])
        heldout, seen = [], set()
        while len(heldout) < n_heldout:
            a, b = (int(v) for v in rng.integers(self.low, self.high, size=2))
            if (a, b) not in seen:
                seen.update({(a, b), (b, a)})
                heldout.append(Problem(a, b))
        self.heldout = heldout
        self._heldout_pairs = frozenset(seen)

    def is_heldout(self, problem):
        return (problem.a, problem.b) in self._heldout_pairs

    def train_problems(self, n, rng):
        """``n`` training problems drawn uniformly from the operand pairs that are not held out."""
        out = []
        while len(out) < n:
            a, b = (int(v) for v in rng.integers(self.low, self.high, size=2))
            if (a, b) not in self._heldout_pairs:
                out.append(Problem(a, b))
        return out

    def prompt_ids(self, tokenizer, problem):
        return tokenizer.apply_chat_template(problem.messages(), add_generation_prompt=True)

    def answer_ids(self, tokenizer, text):
        """The response tokens for ``text``: its ids, then <|im_end|> to end the turn."""
        return tokenizer.encode(text) + [tokenizer.eos_id]

    def demonstration(self, tokenizer, problem):
        """(prompt ids, response ids) of the correct answer, for supervised fine-tuning."""
        return self.prompt_ids(tokenizer, problem), self.answer_ids(tokenizer, str(problem.answer))

    def corpus(self):
        """Text to train the task's tokenizer on: the chat template around the question, digits removed,
        so that no merge joins digits and every digit stays one token (the model adds column by column)."""
        chat = render_chat([{"role": "user", "content": "What is +?"}], add_generation_prompt=True)
        return (chat + "<|im_end|>\n") * 50


def task_tokenizer(task, extra_merges=24):
    """A byte-level BPE trained on ``task.corpus()``: 256 bytes, a few merges, the three special tokens."""
    return BPETokenizer().train(task.corpus(), 256 + extra_merges + len(SPECIAL_TOKENS))
