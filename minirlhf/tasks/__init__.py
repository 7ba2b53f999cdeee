"""The shipped tasks: data the package makes itself (no downloads) and their rule-based rewards."""
from .arithmetic import AdditionTask, Problem, parse_answer, rule_reward, task_tokenizer
from .preferences import (PreferencePair, bradley_terry_probability, gold_score, label_pairs,
                          perturbations)
from .working import WorkingEnvironment, working_reward

__all__ = ["AdditionTask", "Problem", "parse_answer", "rule_reward", "task_tokenizer", "PreferencePair",
           "bradley_terry_probability", "gold_score", "label_pairs", "perturbations",
           "WorkingEnvironment", "working_reward"]
