"""Settings: one dataclass per stage, each field declared once with its default and its meaning.

A field's trailing comment is its meaning; ``minirlhf <stage> --help`` prints it with the default,
which is what a run uses when no flag or ``--config`` file says otherwise. Presets (``demo --quick``)
are overrides of these defaults, never a second copy of them.

Each config checks its own fields when it is made (``check``), before any work is done, and hands
the settings a loss takes to that loss on a one-element batch (``check_with``), so that a config
accepts exactly what its loss accepts.
"""
import inspect
import json
import os
import textwrap
from dataclasses import dataclass, fields

import numpy as np

from ..validation import (is_nonnegative, is_nonnegative_int, is_number, is_positive, is_positive_int,
                          require)


@dataclass
class TrainConfig:
    """What every trainer has; each stage's config adds its own fields and checks."""
    steps: int = 100               # optimizer steps
    lr: float = 1e-4               # peak learning rate of AdamW
    warmup: int = 0                # steps of linear warmup from 0 to lr
    min_lr: float = None           # where the cosine decay ends at the last step (None: no decay after warmup)
    weight_decay: float = 0.0      # AdamW's decoupled weight decay
    clip: float = 1.0              # max global gradient norm; 0 turns clipping off
    seed: int = 0                  # keys every draw of a step (prompts, samples, batches)
    checkpoint_every: int = 0      # steps between checkpoints in the output folder (0: only at the end)

    def __post_init__(self):
        self.check()

    def check(self):
        require(self, "steps", is_positive_int, "a positive integer")
        require(self, "lr", is_positive, "a finite number > 0")
        require(self, "warmup", is_nonnegative_int, "a non-negative integer")
        require(self, "min_lr", lambda v: v is None or (is_number(v) and 0 <= v <= self.lr),
                f"None or a number in [0, lr={self.lr}]")
        require(self, "weight_decay", is_nonnegative, "a finite number >= 0")
        require(self, "clip", is_nonnegative, "a finite number >= 0 (0 = no clipping)")
        require(self, "seed", is_nonnegative_int, "a non-negative integer")
        require(self, "checkpoint_every", is_nonnegative_int, "a non-negative integer")


def check_with(config, loss, *inputs, **settings):
    """Call ``loss(*inputs, **settings)`` on a one-element batch; its refusal becomes the config's error."""
    try:
        loss(*inputs, **settings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{type(config).__name__}: {e}") from None


def one_token_batch():
    """(logp, old_logp, ref_logp, advantages, mask) of one response of one token: what a loss's
    own argument checks need to run."""
    zeros = np.zeros((1, 1), dtype=np.float64)
    return zeros, zeros, zeros, np.zeros(1), np.ones((1, 1))


# ------------------------------------------------------ files, flags and help
def read_json(path, what):
    """The JSON object in ``path``; errors name the file and ``what`` it should be."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder; expected a JSON file")
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(value).__name__}")
    return value


def make_configs(classes, values):
    """One config per class from a flat ``values`` dict (name → value); a key no class has is an error
    that lists the known ones, so a typo never passes silently."""
    known = {f.name for cls in classes for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        names = " / ".join(cls.__name__ for cls in classes)
        raise ValueError(f"{names}: unknown setting(s) {unknown}; known settings are {sorted(known)}")
    return [cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values}) for cls in classes]


def load_config(cls, path=None, **overrides):
    """A ``cls`` config: its defaults, then a JSON file (optional), then ``overrides`` (None values ignored)."""
    values = read_json(path, "config file") if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_configs([cls], values)[0]


def setting_help(cls):
    """{field name: its meaning}, read from the trailing comments of the class (and its bases)."""
    meanings = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not hasattr(klass, "__dataclass_fields__"):
            continue
        try:
            lines = textwrap.dedent(inspect.getsource(klass)).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            code, _, comment = line.partition("#")
            if ":" in code and "=" in code and comment and not code.startswith((" " * 8, "def")):
                name = code.split(":")[0].strip()
                if name.isidentifier():
                    meanings[name] = comment.strip()
    return meanings
