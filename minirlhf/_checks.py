"""Argument checks and conversions of minirlhf.losses: what each loss accepts, turned into
Tensors and masks of the policy's dtype and device, with errors that name the argument,
what it got and what it needed."""
import math
import numbers

import numpy as np

from . import backend
from .tensor import Tensor


def _tensor(x, name):
    if isinstance(x, Tensor):
        return x
    if not (isinstance(x, np.ndarray) or backend.is_cupy_array(x)):
        x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected floating values, got dtype {x.dtype}")
    return Tensor(x, dtype=x.dtype)


def _per_token(x, name):
    """A per-token input (B, T) as a Tensor; any other number of axes is refused by name."""
    t = _tensor(x, name)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected per-token values of shape (B, T), got shape {t.shape}")
    return t


def _array(x, like):
    """``x`` (array, list or Tensor) as an array on ``like``'s device, dtype unchanged."""
    data = x.data if isinstance(x, Tensor) else x
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
        data = np.asarray(data)
    return backend.to_device(data, like.device) if backend.device_of(data) != like.device else data


def _const(x, like, name, shape=None):
    """``x`` as a detached Tensor with ``like``'s dtype and device (optionally checking its shape)."""
    data = _array(x, like)
    if shape is not None and tuple(data.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(data.shape)}")
    return Tensor(like.xp.asarray(data, dtype=like.dtype), dtype=like.dtype)


def _mask(mask, like, name="mask", shape=None):
    """The mask as a 0/1 float array of ``like``'s dtype and device; its shape must equal
    ``shape`` (default: ``like``'s)."""
    m = _array(mask, like)
    shape = tuple(like.shape if shape is None else shape)
    if tuple(m.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(m.shape)} does not match the per-token values' shape "
                         f"{shape}; expected the same (B, T)")
    return (m != 0).astype(like.dtype)


def _per_sequence(x, like, name):
    """A per-sequence value (B,) or per-token one (B, T) as a detached Tensor broadcastable to (B, T)."""
    t = _const(x, like, name)
    if t.shape == (like.shape[0],):
        return t.reshape(like.shape[0], 1)
    if t.shape != like.shape:
        raise ValueError(f"{name}: expected shape ({like.shape[0]},) or {tuple(like.shape)}, got {t.shape}")
    return t


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_finite(value, name):
    if not (_is_real(value) and math.isfinite(value)):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")


def _check_positive(value, name):
    if not (_is_real(value) and 0 < value < math.inf):
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")


def _check_nonnegative(value, name):
    if not (_is_real(value) and 0 <= value < math.inf):
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")


def _check_clip(clip_eps, clip_eps_high):
    if not (_is_real(clip_eps) and 0 < clip_eps < 1):
        raise ValueError(f"clip_eps: must lie in (0, 1), got {clip_eps!r}")
    if clip_eps_high is None:
        return clip_eps
    _check_positive(clip_eps_high, "clip_eps_high")
    return clip_eps_high


def _check_option(value, options, name):
    if value not in options:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {', '.join(map(repr, options))}")


def _groups(rewards, group_size, name="group_size"):
    """(B,) rewards as (B // G, G): consecutive rows are the G samples of one prompt."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards: expected shape (B,), got {rewards.shape}")
    B = rewards.shape[0]
    if group_size is None:
        group_size = B
    if not isinstance(group_size, (int, np.integer)) or group_size < 2:
        raise ValueError(f"{name}: must be an integer >= 2, got {group_size!r}")
    if B % group_size:
        raise ValueError(f"{name}: {group_size} does not divide the batch size {B}")
    return rewards.reshape(B // group_size, group_size)


def _num_tokens(num_tokens, m):
    """The token-mean denominator: Σ mask (at least 1), or ``num_tokens`` where the mean runs over
    more tokens than this batch holds (every micro-batch of an accumulated step)."""
    if num_tokens is None:
        return backend.get_array_module(m).maximum(m.sum(), 1.0)
    if not (_is_real(num_tokens) and 0 < num_tokens < math.inf):
        raise ValueError(f"num_tokens: expected a positive finite number (the token count of the whole "
                         f"accumulated batch), got {num_tokens!r}")
    return float(num_tokens)


def _group_index(rewards, group_size, index):
    """(first, inverse, counts): the groups of (B,) ``rewards`` as ``xp.unique`` gives them — the
    first row of each group, each row's group number and each group's size — from either
    consecutive groups of ``group_size`` or ``index`` (B,) integer ids, one per row (rows with equal
    ids are one group, of any size, 1 included)."""
    xp = rewards.xp
    if index is None:
        _groups(rewards, group_size)
        ids = xp.arange(rewards.shape[0]) // (rewards.shape[0] if group_size is None else group_size)
    else:
        if group_size is not None:
            raise ValueError(f"group_size: give group_size (consecutive groups) or index (group ids), not both; "
                             f"got group_size={group_size!r} with an index")
        if rewards.ndim != 1:
            raise ValueError(f"rewards: expected shape (B,), got {rewards.shape}")
        ids = _array(index, rewards)
        if tuple(ids.shape) != tuple(rewards.shape):
            raise ValueError(f"index: expected shape {tuple(rewards.shape)} (one group id per row), "
                             f"got {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"index: expected integer group ids, got dtype {ids.dtype}")
    _, first, inverse, counts = xp.unique(ids, return_index=True, return_inverse=True, return_counts=True)
    return first, inverse.reshape(-1), counts


def _check_int_range(value, low, high, name, what):
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and low <= value <= high):
        raise ValueError(f"{name}: must be an integer in [{low}, {high}] ({what}), got {value!r}")
