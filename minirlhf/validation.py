"""Checks of settings that name the setting, what it must be, and what it got."""
import math


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_positive(v):
    return is_number(v) and v > 0


def is_nonnegative(v):
    return is_number(v) and v >= 0


def is_positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def is_nonnegative_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def require(config, name, ok, expected):
    """Raise ``ValueError("GRPOConfig: group_size must be an integer >= 2, got 1")`` unless ``ok(value)``."""
    value = getattr(config, name)
    if not ok(value):
        raise ValueError(f"{type(config).__name__}: {name} must be {expected}, got {value!r}")
