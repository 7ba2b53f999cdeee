"""The addition environment: the task, its tokenizer and prompts, its two scores, and the
preference data of the hidden rater.

    rule reward   1 for the right sum, else 0 (verifiable; GRPO and RLOO train on it)
    gold score    the hidden rater's graded score (never trained on; grades reward models and policies)

Scores are functions of (prompt index, response token list), so a trainer never sees the problems.
"""
from dataclasses import dataclass

import numpy as np

from ..rollout import sample
from ..validation import is_nonnegative_int, is_positive, is_positive_int, require
from .arithmetic import AdditionTask, rule_reward, task_tokenizer
from .jsonl import JSONLTask
from .preferences import gold_score, label_pairs, perturbations


@dataclass
class TaskConfig:
    """The shipped task and how policies are evaluated on it."""
    digits: int = 2                # digits of each operand
    n_heldout: int = 200           # held-out problems (evaluation only, never trained on)
    n_train_prompts: int = 4000    # training prompts of the RL stages
    eval_samples: int = 4          # samples per held-out prompt for pass@1 and the gold score
    task_file: str = None          # a JSONL file of {"question", "answer"} problems instead of addition (digits unused)

    def __post_init__(self):
        for name in ("digits", "n_heldout", "n_train_prompts", "eval_samples"):
            require(self, name, is_positive_int, "a positive integer")
        require(self, "task_file", lambda v: v is None or isinstance(v, str), "None or a path")


@dataclass
class PreferenceConfig:
    """Preference pairs labelled by the hidden rater, for the reward model and DPO."""
    pair_prompts: int = 3000       # training prompts that get labelled pairs
    pair_samples: int = 8          # SFT samples per prompt among the candidates
    pair_perturbations: int = 2    # perturbed right answers per prompt among the candidates
    pairs_per_prompt: int = 6      # labelled pairs drawn per prompt
    pair_heldout_prompts: int = 200  # held-out prompts whose gold-ordered pairs grade the reward model
    rater_temperature: float = 0.05  # the rater's Bradley-Terry temperature (lower: fewer wrong labels)

    def __post_init__(self):
        for name in ("pair_prompts", "pair_samples", "pairs_per_prompt", "pair_heldout_prompts"):
            require(self, name, is_positive_int, "a positive integer")
        require(self, "pair_perturbations", is_nonnegative_int, "a non-negative integer")
        require(self, "rater_temperature", is_positive, "a finite number > 0")


class AdditionEnvironment:
    """The task, its tokenizer and prompts, and the two scores as functions of (prompt index, response ids).

    ``tokenizer``: a pretrained model's (its chat template and end-of-turn token); by default a BPE
    trained on the task. With ``config.task_file`` the problems come from the user's JSONL file.
    """

    def __init__(self, config, seed, tokenizer=None):
        self.config = config
        if config.task_file is None:
            self.task = AdditionTask(config.digits, config.n_heldout, seed=seed)
            answer_digits = config.digits + 1
        else:
            self.task = JSONLTask(config.task_file, config.n_heldout)
            answer_digits = self.task.max_answer_digits
        self.tokenizer = tokenizer if tokenizer is not None else task_tokenizer(self.task)
        self.train = self.task.train_problems(config.n_train_prompts, np.random.default_rng([seed, 1]))
        self.heldout = self.task.heldout
        self.train_prompts = [self.task.prompt_ids(self.tokenizer, p) for p in self.train]
        self.heldout_prompts = [self.task.prompt_ids(self.tokenizer, p) for p in self.heldout]
        self.eos_id, self.pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id
        # the answer's digits, one token each with the task's tokenizer (a pretrained one may need more), and the
        # end of the turn, plus one token of slack
        self.max_new_tokens = answer_digits + 2

    def text(self, response):
        if response and response[-1] == self.eos_id:
            response = response[:-1]
        return self.tokenizer.decode(response)

    def scorer(self, problems, score):
        return lambda index, responses: [score(self.text(r), problems[i]) for i, r in zip(index, responses)]

    def rule_reward(self, split="train"):
        return self.scorer(self.train if split == "train" else self.heldout, rule_reward)

    def gold_score(self, split="train"):
        return self.scorer(self.train if split == "train" else self.heldout, gold_score)

    def demonstrations(self, n, seed):
        problems = self.task.train_problems(n, np.random.default_rng([seed, 2]))
        return [self.task.demonstration(self.tokenizer, p) for p in problems]

    def preference_pairs(self, policy, config, seed):
        """Labelled pairs on training prompts, and gold-ordered pairs on held-out prompts (for evaluation)."""
        n, m = config.pair_prompts, config.pair_heldout_prompts
        train_pairs, _ = self._pairs(policy, self.train[:n], self.train_prompts[:n], config, seed + 1)
        _, heldout_pairs = self._pairs(policy, self.heldout[:m], self.heldout_prompts[:m], config, seed + 2)
        return train_pairs, heldout_pairs

    def _pairs(self, policy, problems, prompts, config, seed):
        """Labelled (prompt, chosen, rejected) token triples, and the (better, worse) triples by the gold order.

        Candidates per prompt: samples of the policy at temperature 1, the right answer, and
        perturbations of it; the hidden rater labels each pair by one Bradley-Terry draw.
        """
        k = config.pair_samples
        sampled = sample(policy, prompts, np.arange(len(prompts)), k, 1.0, self.max_new_tokens, self.eos_id,
                         self.pad_id, seed).responses()
        rng = np.random.default_rng([seed, 3])
        labelled, gold_ordered = [], []
        for i, problem in enumerate(problems):
            ids = {self.text(r): r for r in sampled[i * k:(i + 1) * k]}  # samples keep their own tokens
            wrong = perturbations(problem.answer, rng)
            wrong = [wrong[j] for j in rng.permutation(len(wrong))[:config.pair_perturbations]]
            for text in [str(problem.answer)] + wrong:
                ids.setdefault(text, self.task.answer_ids(self.tokenizer, text))
            for pair in label_pairs(problem, list(ids), config.pairs_per_prompt, rng, config.rater_temperature):
                chosen, rejected = ids[pair.chosen], ids[pair.rejected]
                labelled.append((prompts[i], chosen, rejected))
                gold_ordered.append((prompts[i], chosen, rejected) if pair.gold_chosen > pair.gold_rejected
                                    else (prompts[i], rejected, chosen))
        return labelled, gold_ordered
