"""A task from the user's own file: one JSON object per line, ``{"question": str, "answer": int}``.

Scored by the same rule as the addition task (``rule_reward``: the integer the response states,
parsed leniently, equals the answer) and graded by the same hidden rater (``gold_score``). The last
``n_heldout`` lines are the held-out problems; training draws from the others.
"""
import json
import re
from dataclasses import dataclass

from ..tokenizer import render_chat


@dataclass(frozen=True)
class Question:
    question: str
    answer: int

    def messages(self):
        return [{"role": "user", "content": self.question}]


class JSONLTask:
    """Problems read from ``path``; the same interface as :class:`~minirlhf.tasks.arithmetic.AdditionTask`."""

    def __init__(self, path, n_heldout):
        problems = []
        try:
            with open(path, encoding="utf-8") as f:
                lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
        except OSError as e:
            raise ValueError(f"task file {path}: cannot be read ({e})") from None
        for i, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"task file {path}, line {i}: not valid JSON ({e})") from None
            if not (isinstance(row, dict) and isinstance(row.get("question"), str) and row["question"].strip()
                    and isinstance(row.get("answer"), int) and not isinstance(row.get("answer"), bool)):
                raise ValueError(f'task file {path}, line {i}: expected {{"question": a non-empty string, "answer": '
                                 f"an integer}}, got {line.strip()[:80]!r}")
            problems.append(Question(row["question"], row["answer"]))
        if len(problems) <= n_heldout:
            raise ValueError(f"task file {path}: {len(problems)} problems, but n_heldout={n_heldout} of them are held "
                             "out; expected more problems than that, so some remain to train on")
        self.train, self.heldout = problems[:-n_heldout], problems[-n_heldout:]
        self.max_answer_digits = max(len(str(abs(p.answer))) + (p.answer < 0) for p in problems)

    def train_problems(self, n, rng):
        """``n`` training problems drawn uniformly (with replacement) from the training lines."""
        return [self.train[i] for i in rng.integers(len(self.train), size=n)]

    def prompt_ids(self, tokenizer, problem):
        return tokenizer.apply_chat_template(problem.messages(), add_generation_prompt=True)

    def answer_ids(self, tokenizer, text):
        """The response tokens for ``text``: its ids, then the token that ends the turn."""
        return tokenizer.encode(text) + [tokenizer.eos_id]

    def demonstration(self, tokenizer, problem):
        return self.prompt_ids(tokenizer, problem), self.answer_ids(tokenizer, str(problem.answer))

    def corpus(self):
        """Text to train a tokenizer on when no pretrained one is given: the chats of the training
        problems with their digits removed, so every digit stays one token (as for addition)."""
        text = "".join(render_chat(p.messages(), add_generation_prompt=True) + "<|im_end|>\n" for p in self.train)
        return re.sub(r"\d", "", text)
