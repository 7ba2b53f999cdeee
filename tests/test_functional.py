"""Every differentiable op: gradients against finite differences (float64, shapes drawn by
hypothesis, broadcasting included), values and gradients against PyTorch, CuPy against NumPy,
and the bad inputs and extreme values each op must handle.

``OPS`` maps a case name to a builder that draws one random instance of the op: the float
inputs, our function, and the same computation in torch. Inputs avoid the points where an
op is not differentiable (ties of max/min/clip, 0 for abs/relu) by construction.
"""
import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
from decimal import Decimal, getcontext

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import minirlhf
import minirlhf.functional as F
from minirlhf import Tensor, backend
from gradcheck import check_device, check_grad


@dataclass
class Case:
    inputs: list                      # float arrays; each becomes a leaf that needs grad
    fn: Callable                      # our op on those leaves
    torch_fn: Callable                # the same op written with torch, on torch leaves
    fd: dict = field(default_factory=dict)  # check_grad tolerances, where the default ones do not fit
    same_on_devices: bool = True      # False where the op draws random numbers (streams differ per backend)


OPS = {}      # case name -> builder(draw, rng) -> Case
COVERS = {}   # case name -> the functions of minirlhf.functional it exercises


def op(name, *covers):
    def register(builder):
        OPS[name] = builder
        COVERS[name] = covers or (name,)
        return builder
    return register


# ----------------------------------------------------------- drawing inputs
def shape_of(draw, min_dims=0, max_dims=3, max_side=4):
    return tuple(draw(st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims)))


def broadcastable_to(draw, shape):
    """A shape that broadcasts to ``shape``: leading axes dropped, some sides set to 1."""
    kept = shape[draw(st.integers(0, len(shape))):]
    ones = draw(st.lists(st.booleans(), min_size=len(kept), max_size=len(kept)))
    return tuple(1 if one else n for n, one in zip(kept, ones))


def broadcast_pair(draw):
    full = shape_of(draw)
    return broadcastable_to(draw, full), broadcastable_to(draw, full)


def normal(rng, shape):
    return np.asarray(rng.standard_normal(shape))


def positive(rng, shape, low=0.5, high=2.0):
    return np.asarray(rng.uniform(low, high, shape))


def away_from_zero(rng, shape, low=0.2):
    """Values with |x| >= low: no kink of abs/relu within a finite-difference step."""
    return np.asarray(rng.choice([-1.0, 1.0], shape) * rng.uniform(low, 2.0, shape))


def distinct(rng, shape, gap=0.05):
    """Values at least ``gap`` apart from each other: max/min have no ties."""
    size = int(np.prod(shape))
    return np.asarray((rng.permutation(size) * gap + rng.uniform(-1, 1)).reshape(shape))


def axis_arg(draw, ndim):
    """None, one axis (maybe negative) or a tuple of distinct axes."""
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    return tuple(draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True)))


def torch_dims(axis, ndim):
    return tuple(range(ndim)) if axis is None else axis


def on(x, array):
    """A constant array on the device of Tensor ``x``."""
    return x.xp.asarray(array)


def torch():
    import torch as _torch
    return _torch


def tf():
    import torch.nn.functional as _tf
    return _tf


# ------------------------------------------------------------- arithmetic
def _binary(draw, rng, make_a, make_b, ours, theirs):
    """a op b with broadcasting; sometimes one side is a Python number."""
    sa, sb = broadcast_pair(draw)
    a, b = make_a(rng, sa), make_b(rng, sb)
    kind = draw(st.sampled_from(["tensor-tensor", "tensor-number", "number-tensor"]))
    if kind == "tensor-number":
        k = float(make_b(rng, ()))
        return Case([a], lambda x: ours(x, k), lambda x: theirs(x, k))
    if kind == "number-tensor":
        k = float(make_a(rng, ()))
        return Case([b], lambda y: ours(k, y), lambda y: theirs(k, y))
    return Case([a, b], ours, theirs)


@op("add")
def _(draw, rng):
    return _binary(draw, rng, normal, normal, lambda a, b: a + b, lambda a, b: a + b)


@op("sub")
def _(draw, rng):
    return _binary(draw, rng, normal, normal, lambda a, b: a - b, lambda a, b: a - b)


@op("mul")
def _(draw, rng):
    return _binary(draw, rng, normal, normal, lambda a, b: a * b, lambda a, b: a * b)


@op("div")
def _(draw, rng):
    return _binary(draw, rng, normal, away_from_zero, lambda a, b: a / b, lambda a, b: a / b)


@op("neg")
def _(draw, rng):
    return Case([normal(rng, shape_of(draw))], lambda x: -x, lambda x: -x)


@op("pow_scalar_exponent", "pow")
def _(draw, rng):
    p = draw(st.sampled_from([0, 1, 2, 3, -1, -2, 0.5, 1.5, -0.5]))
    shape = shape_of(draw)
    x = away_from_zero(rng, shape, 0.3) if float(p).is_integer() else positive(rng, shape)
    return Case([x], lambda x: x ** p, lambda x: x ** p)


@op("pow_tensor_exponent", "pow")
def _(draw, rng):
    return _binary(draw, rng, positive, normal, lambda a, b: a ** b, lambda a, b: a ** b)


@op("matmul")
def _(draw, rng):
    m, k, n = (draw(st.integers(1, 4)) for _ in range(3))
    batch = shape_of(draw, max_dims=2, max_side=3)
    kind = draw(st.sampled_from(["1d@1d", "1d@nd", "nd@1d", "nd@nd"]))
    if kind == "1d@1d":
        sa, sb = (k,), (k,)
    elif kind == "1d@nd":
        sa, sb = (k,), broadcastable_to(draw, batch) + (k, n)
    elif kind == "nd@1d":
        sa, sb = broadcastable_to(draw, batch) + (m, k), (k,)
    else:
        sa, sb = broadcastable_to(draw, batch) + (m, k), broadcastable_to(draw, batch) + (k, n)
    return Case([normal(rng, sa), normal(rng, sb)], lambda a, b: a @ b, lambda a, b: a @ b)


# -------------------------------------------------------------- reductions
@op("sum")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    axis, keepdims = axis_arg(draw, len(shape)), draw(st.booleans())
    return Case([normal(rng, shape)], lambda x: x.sum(axis, keepdims),
                lambda x: x.sum(dim=torch_dims(axis, len(shape)), keepdim=keepdims))


@op("mean")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    axis, keepdims = axis_arg(draw, len(shape)), draw(st.booleans())
    return Case([normal(rng, shape)], lambda x: x.mean(axis, keepdims),
                lambda x: x.mean(dim=torch_dims(axis, len(shape)), keepdim=keepdims))


@op("max")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    axis, keepdims = axis_arg(draw, len(shape)), draw(st.booleans())
    return Case([distinct(rng, shape)], lambda x: x.max(axis, keepdims),
                lambda x: torch().amax(x, dim=torch_dims(axis, len(shape)), keepdim=keepdims))


@op("logsumexp")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    axis = axis_arg(draw, len(shape))
    axis = -1 if axis is None else axis
    keepdims = draw(st.booleans())
    return Case([normal(rng, shape) * 3], lambda x: F.logsumexp(x, axis, keepdims),
                lambda x: torch().logsumexp(x, dim=axis, keepdim=keepdims))


# ------------------------------------------------------------- elementwise
def _unary(name, make=normal, torch_name=None):
    @op(name)
    def _(draw, rng):
        ours = getattr(F, name)
        return Case([make(rng, shape_of(draw))], ours,
                    lambda x: getattr(torch(), torch_name or name)(x))


_unary("exp")
_unary("log", positive)
_unary("sqrt", positive)
_unary("abs", away_from_zero)
_unary("tanh")
_unary("sigmoid")
_unary("relu", away_from_zero)


@op("gelu")
def _(draw, rng):
    return Case([normal(rng, shape_of(draw)) * 2], F.gelu, lambda x: tf().gelu(x, approximate="tanh"))


@op("softplus")
def _(draw, rng):
    return Case([normal(rng, shape_of(draw)) * 4], F.softplus, lambda x: tf().softplus(x))


@op("log_sigmoid")
def _(draw, rng):
    return Case([normal(rng, shape_of(draw)) * 4], F.log_sigmoid, lambda x: tf().logsigmoid(x))


@op("k3")
def _(draw, rng):
    return Case([normal(rng, shape_of(draw)) * 2], F.k3, lambda x: torch().expm1(x) - x)


def _log1mexp_torch(x):
    t = torch()
    return t.where(x > -np.log(2), t.log(-t.expm1(x)), t.log1p(-t.exp(x)))


@op("log1mexp")
def _(draw, rng):
    shape = shape_of(draw)
    return Case([-positive(rng, shape, 0.05, 5.0)], F.log1mexp, _log1mexp_torch)


@op("softmax")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return Case([normal(rng, shape) * 2], lambda x: F.softmax(x, axis), lambda x: x.softmax(dim=axis))


@op("log_softmax")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return Case([normal(rng, shape) * 2], lambda x: F.log_softmax(x, axis), lambda x: x.log_softmax(dim=axis))


@op("astype")
def _(draw, rng):
    # float64 -> float32 -> float64 rounds to float32, so the finite differences take a wide step
    return Case([normal(rng, shape_of(draw))], lambda x: F.astype(F.astype(x, np.float32), np.float64) * 2,
                lambda x: x.to(torch().float32).to(torch().float64) * 2, fd=dict(eps=1e-2, atol=1e-4))


@op("clip")
def _(draw, rng):
    shape = shape_of(draw)
    lo, hi = draw(st.sampled_from([(-0.5, 0.5), (None, 0.3), (-0.3, None)]))
    # values on a 0.1-grid offset by 0.05 never sit within a finite-difference step of a bound
    x = np.asarray(rng.integers(-20, 20, shape) * 0.1 + 0.05)
    return Case([x], lambda x: F.clip(x, lo, hi), lambda x: torch().clamp(x, lo, hi))


def _tie_free_pair(draw, rng):
    sa, sb = broadcast_pair(draw)
    a = np.asarray(rng.integers(-10, 10, sa) * 0.3)
    b = np.asarray(rng.integers(-10, 10, sb) * 0.3 + 0.15)
    return a, b


@op("maximum")
def _(draw, rng):
    return Case(list(_tie_free_pair(draw, rng)), F.maximum, lambda a, b: torch().maximum(a, b))


@op("minimum")
def _(draw, rng):
    return Case(list(_tie_free_pair(draw, rng)), F.minimum, lambda a, b: torch().minimum(a, b))


# ------------------------------------------------------------------ shapes
@op("reshape")
def _(draw, rng):
    shape = shape_of(draw)
    size = int(np.prod(shape))
    target = draw(st.sampled_from([(-1,), (size, 1), (1, -1), tuple(reversed(shape)), (1,) + shape]))
    return Case([normal(rng, shape)], lambda x: x.reshape(target), lambda x: x.reshape(target))


@op("transpose")
def _(draw, rng):
    shape = shape_of(draw, min_dims=2)
    a0, a1 = (draw(st.integers(-len(shape), len(shape) - 1)) for _ in range(2))
    return Case([normal(rng, shape)], lambda x: x.transpose(a0, a1), lambda x: x.transpose(a0, a1))


@op("permute")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    axes = tuple(draw(st.permutations(range(len(shape)))))
    return Case([normal(rng, shape)], lambda x: x.permute(axes), lambda x: x.permute(axes))


@op("unsqueeze")
def _(draw, rng):
    shape = shape_of(draw)
    axis = draw(st.integers(-len(shape) - 1, len(shape)))
    return Case([normal(rng, shape)], lambda x: x.unsqueeze(axis), lambda x: x.unsqueeze(axis))


@op("squeeze")
def _(draw, rng):
    shape = shape_of(draw)
    at = draw(st.integers(0, len(shape)))
    shape = shape[:at] + (1,) + shape[at:]
    axis = draw(st.sampled_from([at, at - len(shape)]))
    return Case([normal(rng, shape)], lambda x: x.squeeze(axis), lambda x: x.squeeze(axis))


@op("expand")
def _(draw, rng):
    target = shape_of(draw, min_dims=1)
    shape = broadcastable_to(draw, target)
    lead = len(target) - len(shape)
    # -1 keeps an existing side, as in torch
    spelled = tuple(-1 if i >= lead and shape[i - lead] == n and draw(st.booleans()) else n
                    for i, n in enumerate(target))
    return Case([normal(rng, shape)], lambda x: x.expand(spelled), lambda x: x.expand(spelled))


@op("index")
def _(draw, rng):
    shape = shape_of(draw, min_dims=2, max_dims=3)
    x = normal(rng, shape)
    kind = draw(st.sampled_from(["slices", "int-and-slice", "none-ellipsis", "int-array", "two-int-arrays",
                                 "int-array-second-axis", "bool-mask"]))
    if kind == "slices":
        start = draw(st.integers(0, shape[0] - 1))
        step = draw(st.integers(1, 2))
        key = (slice(start, None), slice(None, None, step))
    elif kind == "int-and-slice":
        key = (draw(st.integers(-shape[0], shape[0] - 1)), slice(1, None))
    elif kind == "none-ellipsis":
        key = (None, Ellipsis, draw(st.integers(0, shape[-1] - 1)))
    elif kind == "int-array":       # repeated rows accumulate their gradients
        key = rng.integers(-shape[0], shape[0], draw(st.integers(1, 6)))
    elif kind == "two-int-arrays":
        n = draw(st.integers(1, 6))
        key = (rng.integers(0, shape[0], n), rng.integers(0, shape[1], n))
    elif kind == "int-array-second-axis":
        key = (slice(None), rng.integers(0, shape[1], (2, 3)))
    else:
        key = rng.random(shape[:2]) < 0.5

    def ours(t):
        items = key if isinstance(key, tuple) else (key,)
        moved = tuple(on(t, k) if isinstance(k, np.ndarray) else k for k in items)
        return t[moved if isinstance(key, tuple) else moved[0]]

    def theirs(t):
        items = key if isinstance(key, tuple) else (key,)
        moved = tuple(torch().from_numpy(k) if isinstance(k, np.ndarray) else k for k in items)
        return t[moved if isinstance(key, tuple) else moved[0]]
    return Case([x], ours, theirs)


@op("gather")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    # as torch.gather: the index may be smaller than the input along the other axes, any size along axis
    index_shape = tuple(draw(st.integers(1, 5)) if i == axis % len(shape) else draw(st.integers(1, n))
                        for i, n in enumerate(shape))
    index = rng.integers(0, shape[axis], index_shape)
    return Case([normal(rng, shape)], lambda x: F.gather(x, axis, on(x, index)),
                lambda x: torch().gather(x, axis, torch().from_numpy(index)))


@op("embedding")
def _(draw, rng):
    V, D = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    ids = rng.integers(0, V, shape_of(draw, max_dims=2, max_side=6))  # repeated ids accumulate
    return Case([normal(rng, (V, D))], lambda w: F.embedding(on(w, ids), w),
                lambda w: tf().embedding(torch().from_numpy(ids), w))


@op("masked_fill")
def _(draw, rng):
    shape = shape_of(draw)
    mask = np.asarray(rng.random(broadcastable_to(draw, shape)) < 0.5)
    value = float(rng.standard_normal())
    return Case([normal(rng, shape)], lambda x: F.masked_fill(x, on(x, mask), value),
                lambda x: x.masked_fill(torch().from_numpy(mask), value))


@op("where")
def _(draw, rng):
    full = shape_of(draw)
    cond = np.asarray(rng.random(broadcastable_to(draw, full)) < 0.5)
    a, b = normal(rng, broadcastable_to(draw, full)), normal(rng, broadcastable_to(draw, full))
    if draw(st.booleans()):
        return Case([a, b], lambda a, b: F.where(on(a, cond), a, b),
                    lambda a, b: torch().where(torch().from_numpy(cond), a, b))
    return Case([a], lambda a: F.where(on(a, cond), a, 0.5),
                lambda a: torch().where(torch().from_numpy(cond), a, 0.5))


@op("cat")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    parts = [normal(rng, tuple(s if i == axis % len(shape) else n for i, n in enumerate(shape))) for s in sizes]
    return Case(parts, lambda *ts: F.cat(ts, axis), lambda *ts: torch().cat(ts, dim=axis))


@op("stack")
def _(draw, rng):
    shape = shape_of(draw)
    axis = draw(st.integers(-len(shape) - 1, len(shape)))
    parts = [normal(rng, shape) for _ in range(draw(st.integers(1, 3)))]
    return Case(parts, lambda *ts: F.stack(ts, axis), lambda *ts: torch().stack(ts, dim=axis))


# --------------------------------------------------------- network layers
@op("linear")
def _(draw, rng):
    n_in, n_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = normal(rng, shape_of(draw, max_dims=2) + (n_in,))
    w, b = normal(rng, (n_out, n_in)), normal(rng, (n_out,))
    if draw(st.booleans()):
        return Case([x, w, b], F.linear, lambda x, w, b: tf().linear(x, w, b))
    return Case([x, w], F.linear, lambda x, w: tf().linear(x, w))


@op("layer_norm")
def _(draw, rng):
    normalized = shape_of(draw, min_dims=1, max_dims=2, max_side=5)
    if int(np.prod(normalized)) < 2:
        normalized = normalized[:-1] + (3,)
    x = normal(rng, shape_of(draw, max_dims=2) + normalized) * 2 + 1
    affine = draw(st.sampled_from(["none", "weight", "bias", "both"]))
    w = normal(rng, normalized) if affine in ("weight", "both") else None
    b = normal(rng, normalized) if affine in ("bias", "both") else None
    inputs = [x] + [p for p in (w, b) if p is not None]

    def unpack(args):
        args = list(args)
        xx = args.pop(0)
        ww = args.pop(0) if w is not None else None
        bb = args.pop(0) if b is not None else None
        return xx, ww, bb

    def ours(*args):
        xx, ww, bb = unpack(args)
        return F.layer_norm(xx, normalized, ww, bb)

    def theirs(*args):
        xx, ww, bb = unpack(args)
        return tf().layer_norm(xx, normalized, ww, bb)
    return Case(inputs, ours, theirs)


@op("dropout")
def _(draw, rng):
    shape = shape_of(draw, min_dims=1)
    p = draw(st.sampled_from([0.1, 0.5, 0.75]))
    seed = int(rng.integers(2 ** 31))

    def ours(x):
        return F.dropout(x, p, training=True, generator=x.xp.random.default_rng(seed))

    def theirs(x):
        keep = np.random.default_rng(seed).random(shape) >= p  # the mask our generator draws
        return x * torch().from_numpy(keep) / (1 - p)
    return Case([normal(rng, shape)], ours, theirs, same_on_devices=False)


def _attention_inputs(draw, rng, T=None, S=None):
    batch = shape_of(draw, max_dims=2, max_side=2)
    T = T or draw(st.integers(1, 4))
    S = S or draw(st.integers(1, 4))
    d, dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return [normal(rng, batch + (T, d)), normal(rng, batch + (S, d)), normal(rng, batch + (S, dv))], T, S


@op("attention", "scaled_dot_product_attention")
def _(draw, rng):
    inputs, _, _ = _attention_inputs(draw, rng)
    return Case(inputs, F.scaled_dot_product_attention, lambda q, k, v: tf().scaled_dot_product_attention(q, k, v))


@op("attention_causal", "scaled_dot_product_attention")
def _(draw, rng):
    # bottom-right causal mask: query i sees keys j <= i + S - T (a cache of S - T keys before the block)
    T = draw(st.integers(1, 4))
    S = T + draw(st.integers(0, 3))
    inputs, T, S = _attention_inputs(draw, rng, T, S)
    allowed = np.tril(np.ones((T, S), dtype=bool), k=S - T)
    return Case(inputs, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                lambda q, k, v: tf().scaled_dot_product_attention(q, k, v, attn_mask=torch().from_numpy(allowed)))


@op("attention_bool_mask", "scaled_dot_product_attention")
def _(draw, rng):
    inputs, T, S = _attention_inputs(draw, rng)
    causal = draw(st.booleans()) and T <= S
    visible = np.tril(np.ones((T, S), dtype=bool), k=S - T) if causal else np.ones((T, S), dtype=bool)
    allowed = rng.random((T, S)) < 0.6
    for i in range(T):          # every query sees at least one key that the causal mask also lets through
        allowed[i, rng.choice(np.flatnonzero(visible[i]))] = True
    return Case(inputs, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, on(q, allowed), is_causal=causal),
                lambda q, k, v: tf().scaled_dot_product_attention(
                    q, k, v, attn_mask=torch().from_numpy(allowed & visible)))


@op("attention_padding_rows", "scaled_dot_product_attention")
def _(draw, rng):
    # query rows that may attend to nothing (padding) give zeros and pass no gradient
    inputs, T, S = _attention_inputs(draw, rng, T=draw(st.integers(2, 4)))
    allowed = rng.random((T, S)) < 0.7
    allowed[np.arange(T), rng.integers(0, S, T)] = True
    padded = rng.random(T) < 0.5
    padded[0] = True
    allowed[padded] = False
    some = allowed.copy()
    some[padded] = True

    def theirs(q, k, v):
        out = tf().scaled_dot_product_attention(q, k, v, attn_mask=torch().from_numpy(some))
        return out * torch().from_numpy(~padded)[:, None]
    return Case(inputs, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, on(q, allowed)), theirs)


@contextlib.contextmanager
def query_blocks(n):
    """Causal attention in blocks of ``n`` queries (the op reads the size in its forward only)."""
    saved, F._QUERY_BLOCK = F._QUERY_BLOCK, n
    try:
        yield
    finally:
        F._QUERY_BLOCK = saved


@op("attention_causal_blocks", "scaled_dot_product_attention")
def _(draw, rng):
    # causal attention over blocks of 1–3 queries, each over only the keys it sees, with a cache of keys
    # before the block (S > T) or more queries than keys (T > S: the first rows see no key and give 0)
    n = draw(st.integers(1, 3))
    T = draw(st.integers(1, 7))
    S = max(1, T + draw(st.integers(-3, 3)))
    inputs, T, S = _attention_inputs(draw, rng, T, S)
    allowed = np.tril(np.ones((T, S), dtype=bool), k=S - T)
    if draw(st.booleans()):
        allowed &= rng.random((T, S)) < 0.7
    sees = allowed.any(axis=1)
    some = allowed | ~sees[:, None]

    def ours(q, k, v):
        with query_blocks(n):
            return F.scaled_dot_product_attention(q, k, v, on(q, allowed), is_causal=True)

    def theirs(q, k, v):
        out = tf().scaled_dot_product_attention(q, k, v, attn_mask=torch().from_numpy(some))
        return out * torch().from_numpy(sees)[:, None]
    return Case(inputs, ours, theirs)


# ------------------------------------------------------------ log-probs
@op("token_logprobs")
def _(draw, rng):
    shape, V = shape_of(draw, max_dims=2), draw(st.integers(1, 6))
    targets = rng.integers(0, V, shape)
    return Case([normal(rng, shape + (V,)) * 3], lambda z: F.token_logprobs(z, on(z, targets)),
                lambda z: z.log_softmax(-1).gather(-1, torch().from_numpy(targets)[..., None])[..., 0])


@op("linear_token_logprobs")
def _(draw, rng):
    rows = shape_of(draw, min_dims=1, max_dims=2, max_side=5)
    C, V = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    chunk_size = draw(st.integers(1, 4))        # several chunks, the last one partial
    targets = rng.integers(0, V, rows)
    return Case([normal(rng, rows + (C,)), normal(rng, (V, C))],
                lambda h, w: F.linear_token_logprobs(h, w, on(h, targets), chunk_size=chunk_size),
                lambda h, w: (h @ w.T).log_softmax(-1).gather(-1, torch().from_numpy(targets)[..., None])[..., 0])


@op("cross_entropy")
def _(draw, rng):
    shape, V = shape_of(draw, min_dims=1, max_dims=2), draw(st.integers(1, 6))
    targets = rng.integers(0, V, shape)
    targets[rng.random(shape) < 0.2] = -100
    mask = (rng.random(shape) < 0.7) if draw(st.booleans()) else None
    keep = (targets != -100) & (True if mask is None else mask)

    def ours(z):
        return F.cross_entropy(z, on(z, targets), None if mask is None else on(z, mask))

    def theirs(z):
        per_token = tf().cross_entropy(z.reshape(-1, V), torch().from_numpy(targets.reshape(-1)),
                                       ignore_index=-100, reduction="none")
        return (per_token * torch().from_numpy(keep.reshape(-1))).sum() / max(int(keep.sum()), 1)
    return Case([normal(rng, shape + (V,)) * 2], ours, theirs)


# ------------------------------------------------------------ the checks
EXEMPT = {"to_device": "moves between devices; its gradient is checked on a GPU in test_tensor.py",
          "rms_norm": "checked in test_functional_llama.py", "silu": "checked in test_functional_llama.py",
          "rotary_embedding": "checked in test_functional_llama.py"}


def _public_functions():
    return {name for name, f in vars(F).items()
            if inspect.isfunction(f) and f.__module__ == F.__name__ and not name.startswith("_")}


def test_every_public_op_has_a_gradient_check():
    covered = {f for covers in COVERS.values() for f in covers}
    missing = _public_functions() - covered - set(EXEMPT)
    assert not missing, f"ops without a gradient check in OPS: {sorted(missing)}"
    assert covered <= _public_functions(), f"OPS names unknown ops: {sorted(covered - _public_functions())}"
    required = {"add", "sub", "mul", "div", "neg", "pow", "matmul", "sum", "mean", "max", "exp", "log", "sqrt",
                "abs", "tanh", "sigmoid", "relu", "gelu", "softplus", "softmax", "log_softmax", "logsumexp",
                "log_sigmoid", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "index",
                "gather", "embedding", "masked_fill", "where", "cat", "stack", "clip", "minimum", "maximum",
                "layer_norm", "dropout", "linear", "scaled_dot_product_attention", "cross_entropy",
                "token_logprobs", "astype"}
    assert required <= covered, f"ops the engine must have, unchecked: {sorted(required - covered)}"


def _draw_case(name, data):
    seed = data.draw(st.integers(0, 2 ** 32 - 1), label="seed")
    return OPS[name](data.draw, np.random.default_rng(seed))


@pytest.mark.parametrize("name", sorted(OPS))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_gradients_match_finite_differences(name, device, data):
    case = _draw_case(name, data)
    if device == "cpu":
        check_grad(case.fn, *case.inputs, **case.fd)
        # float32 on NumPy: gradients keep float32 (no promotion inside a backward) and agree with float64
        check_device(case.fn, *case.inputs, device="cpu")
    elif case.same_on_devices:
        check_device(case.fn, *case.inputs, device=device)
    else:
        pytest.skip("draws random numbers: the CuPy stream differs from NumPy's (see test_dropout_*)")


@pytest.mark.parametrize("name", sorted(OPS))
@given(data=st.data())
def test_values_and_gradients_match_torch(name, data):
    torch = pytest.importorskip("torch")
    case = _draw_case(name, data)
    leaves = [Tensor(a, requires_grad=True, dtype=np.float64) for a in case.inputs]
    out = case.fn(*leaves)
    c = np.random.default_rng(1).standard_normal(out.shape)
    (out * c).sum().backward()
    t_leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in case.inputs]
    t_out = case.torch_fn(*t_leaves)
    (t_out * torch.from_numpy(np.asarray(c))).sum().backward()
    assert out.shape == tuple(t_out.shape)
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-7, atol=1e-7)
    for i, (ours, theirs) in enumerate(zip(leaves, t_leaves)):
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-7, atol=1e-7,
                                   err_msg=f"gradient of input {i}")


# ------------------------------------------------------------- bad input
def test_matmul_of_misaligned_shapes_names_both_shapes():
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) do not align: "
                                         r"a.shape\[-1\]=3 must equal b.shape\[-2\]=4"):
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"matmul: batch shapes \(2,\) and \(3,\) of inputs \(2, 3, 4\) and "
                                         r"\(3, 4, 5\) cannot broadcast"):
        Tensor(np.ones((2, 3, 4))) @ Tensor(np.ones((3, 4, 5)))
    with pytest.raises(ValueError, match=r"matmul: inputs must have at least 1 dimension, got shapes \(\) and"):
        Tensor(1.0) @ Tensor(np.ones(3))


@pytest.mark.parametrize("name, fn", [("add", lambda a, b: a + b), ("sub", lambda a, b: a - b),
                                      ("mul", lambda a, b: a * b), ("div", lambda a, b: a / b),
                                      ("maximum", F.maximum), ("where", lambda a, b: F.where(True, a, b))])
def test_shapes_that_do_not_broadcast_are_named_with_the_op(name, fn):
    with pytest.raises(ValueError, match=rf"{name}: cannot broadcast shapes \(2, 3\) and \(4,\); expected each "
                                         r"trailing dimension to be equal or 1"):
        fn(Tensor(np.ones((2, 3))), Tensor(np.ones(4)))


@pytest.mark.parametrize("op, call", [
    ("embedding", lambda ids: F.embedding(ids, Tensor(np.ones((5, 2))))),
    ("gather", lambda ids: F.gather(Tensor(np.ones((2, 5))), 1, ids)),
    ("token_logprobs", lambda ids: F.token_logprobs(Tensor(np.ones((2, 5))), ids)),
    ("cross_entropy", lambda ids: F.cross_entropy(Tensor(np.ones((2, 5))), ids)),
    ("linear_token_logprobs", lambda ids: F.linear_token_logprobs(Tensor(np.ones((2, 3))), Tensor(np.ones((5, 3))),
                                                                  ids)),
])
def test_float_ids_are_rejected_naming_the_op_and_dtype(op, call):
    with pytest.raises(TypeError, match=rf"{op}: \w+ must be an integer array, got dtype float32"):
        call(np.zeros((2, 1) if op == "gather" else 2, dtype=np.float32))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(-12, 11), min_size=1, max_size=60),
       st.sampled_from([(1,), (3,), (16,), (128,), (2, 64), (24,)]), st.integers(0, 2**31 - 1))
@example(3, [0] * 10 + [2, 1, -1] * 4, (128,), 0)
@example(3, [1] * 9 + [0], (2, 64), 1)
@example(2, [-2] * 12 + [1], (24,), 2)
def test_scatter_add_of_rows_equals_np_add_at(n, index, width, seed):
    """backend.scatter_add along the first axis (the backward of x[rows] and of embeddings) sums repeated
    rows as np.add.at does, through both of its paths (rows repeated at most 8 times, and more), with
    negative rows meaning rows from the end; float64 rows of 128 (1 KB) are summed from a copy laid a
    cache line further apart, rows of 1, 3, 16 and 24 as they are."""
    rows = np.array([i % n if i >= n else i for i in index], dtype=np.int64)
    rows = np.where(rows < -n, rows % n, rows)
    values = np.random.default_rng(seed).standard_normal((len(rows),) + width)
    expected = np.zeros((n,) + width)
    np.add.at(expected, rows, values)
    got = np.zeros((n,) + width)
    backend.scatter_add(got, rows, values)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_float_index_arrays_are_rejected():
    with pytest.raises(TypeError, match="index: index arrays must be integer or boolean, got dtype float64"):
        Tensor(np.ones(3))[np.array([0.0, 1.0])]


def test_out_of_range_ids_name_the_range_and_the_values_found():
    weight = Tensor(np.ones((5, 2)))
    with pytest.raises(IndexError, match=r"embedding: ids must lie in \[0, 5\) for a table of shape \(5, 2\), "
                                         r"got min 0 max 7"):
        F.embedding(np.array([0, 7, 3]), weight)
    with pytest.raises(IndexError, match=r"embedding: ids must lie in \[0, 5\).*got min -1 max 2"):
        F.embedding(np.array([-1, 2]), weight)
    with pytest.raises(IndexError, match=r"token_logprobs: targets must lie in \[0, 5\), got min 0 max 5"):
        F.token_logprobs(Tensor(np.ones((2, 5))), np.array([0, 5]))
    with pytest.raises(IndexError, match=r"gather: index values must lie in \[0, 5\) for axis 1 of shape \(2, 5\), "
                                         r"got min -1 max 1"):
        F.gather(Tensor(np.ones((2, 5))), 1, np.array([[-1], [1]]))


def test_shape_errors_name_the_op_and_the_shapes():
    x = Tensor(np.ones((2, 3)))
    cases = [
        (lambda: F.gather(x, 1, np.zeros((3, 1), dtype=np.int64)), ValueError,
         r"gather: index of shape \(3, 1\) does not fit input of shape \(2, 3\)"),
        (lambda: F.token_logprobs(x, np.zeros(3, dtype=np.int64)), ValueError,
         r"token_logprobs: targets shape \(3,\) must equal logits shape without its last axis \(2,\)"),
        (lambda: x.reshape(4, 2), ValueError, r"reshape: cannot reshape shape \(2, 3\) \(6 elements\) into \(4, 2\)"),
        (lambda: x.squeeze(0), ValueError, r"squeeze: axis 0 of shape \(2, 3\) has size 2, expected 1"),
        (lambda: x.permute(0, 0), ValueError, r"permute: axes \(0, 0\) are not a permutation of range\(2\)"),
        (lambda: x.expand(4, 3), ValueError, r"expand: cannot broadcast shape \(2, 3\) to \(4, 3\)"),
        (lambda: F.cat([x, Tensor(np.ones((3, 2)))], axis=0), ValueError,
         r"cat: shapes \[\(2, 3\), \(3, 2\)\] differ outside axis 0"),
        (lambda: F.stack([x, Tensor(np.ones((3, 2)))]), ValueError, r"stack: all tensors must have the same shape"),
        (lambda: F.layer_norm(x, 4), ValueError, r"layer_norm: input shape \(2, 3\) does not end with "
                                                 r"normalized_shape \(4,\)"),
        (lambda: F.masked_fill(x, np.ones(4, dtype=bool), 0.0), ValueError,
         r"masked_fill: mask of shape \(4,\) does not broadcast to input shape \(2, 3\)"),
        (lambda: F.scaled_dot_product_attention(x, Tensor(np.ones((2, 4))), x), ValueError,
         r"scaled_dot_product_attention: q \(2, 3\), k \(2, 4\), v \(2, 3\) do not fit"),
        (lambda: F.dropout(x, 1.0), ValueError, r"dropout: p must be in \[0, 1\), got 1.0"),
        (lambda: F.linear(x, Tensor(np.ones((4, 5)))), ValueError,
         r"linear: input of shape \(2, 3\) and weight of shape \(4, 5\) do not fit"),
        (lambda: Tensor(np.ones((0, 3))).max(axis=0), ValueError,
         r"max: cannot reduce over an empty axis of shape \(0, 3\)"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


# ----------------------------------------------------- extreme values
EXTREME = np.array([[1000.0, -1000.0, 0.0], [1e4, -1e4, 1.0], [-1e4, -1e4, -1e4]])


def _value_and_grad(fn, x, device, dtype=np.float64):
    t = Tensor(x, requires_grad=True, dtype=dtype, device=device)
    out = fn(t)
    out.sum().backward()
    return out.numpy(), backend.to_numpy(t.grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_family_stays_finite_at_extreme_logits(device, dtype):
    targets = np.array([0, 1, 2])
    fns = {
        "softmax": lambda z: F.softmax(z, -1),
        "log_softmax": lambda z: F.log_softmax(z, -1),
        "logsumexp": lambda z: F.logsumexp(z, -1),
        "token_logprobs": lambda z: F.token_logprobs(z, z.xp.asarray(targets)),
        "cross_entropy": lambda z: F.cross_entropy(z, z.xp.asarray(targets)),
    }
    for name, fn in fns.items():
        out, grad = _value_and_grad(fn, EXTREME, device, dtype)
        assert np.isfinite(out).all() and np.isfinite(grad).all(), name
    log_p, _ = _value_and_grad(lambda z: F.log_softmax(z, -1), EXTREME, device, dtype)
    np.testing.assert_allclose(log_p[0], [0.0, -2000.0, -1000.0])
    np.testing.assert_allclose(log_p[1], [0.0, -2e4, 1.0 - 1e4])
    np.testing.assert_allclose(log_p[2], np.full(3, -np.log(3)), rtol=1e-6)
    lse, _ = _value_and_grad(lambda z: F.logsumexp(z, -1), EXTREME, device, dtype)
    np.testing.assert_allclose(lse, [1000.0, 1e4, -1e4 + np.log(3)], rtol=1e-7)


@pytest.mark.parametrize("logits, target", [([1e30, 1e30, -1e30, 0.0], 0), ([1e30, 1e30, -1e30, 0.0], 2),
                                            ([-1e30, 5.0, -1e30, 5.0], 1), ([1e300, 1e300, 1.0, -1e300], 1)])
def test_token_logprobs_equal_log_softmax_at_extreme_scales(logits, target):
    """x_t − (m + log s) rounds log s away when |m| >> log s ([1e30, 1e30, ...] gave 0, not −log 2)."""
    z = Tensor(np.array([logits]), requires_grad=True, dtype=np.float64)
    got = F.token_logprobs(z, np.array([target]))
    want = F.log_softmax(Tensor(np.array([logits]), dtype=np.float64), -1).numpy()[0, target]
    assert got.item() == want
    got.sum().backward()
    assert np.isfinite(z.grad).all()


def test_token_logprobs_of_float32_logits_near_1e4_are_exact_to_float32_precision():
    logits = np.array([[-1e4, -1e4, -1e4, -9999.0]], dtype=np.float32)
    got = F.token_logprobs(Tensor(logits), np.array([3])).item()
    want = -np.log1p(3 * np.exp(-1.0))        # the last logit is 1 above three equal ones
    assert got == pytest.approx(want, rel=1e-6)
    assert np.float32(got) == F.log_softmax(Tensor(logits), -1).numpy()[0, 3]


def test_token_logprobs_of_a_row_with_banned_tokens_are_finite():
    z = Tensor(np.array([[-np.inf, 0.0, 0.0], [2.0, -np.inf, -np.inf]]), requires_grad=True, dtype=np.float64)
    got = F.token_logprobs(z, np.array([1, 0]))
    np.testing.assert_allclose(got.numpy(), [-np.log(2), 0.0])
    got.sum().backward()
    np.testing.assert_allclose(z.grad, [[0, 0.5, -0.5], [0, 0, 0]])


@pytest.mark.parametrize("name, call", [
    ("softmax", lambda x: F.softmax(x, -1)), ("log_softmax", lambda x: F.log_softmax(x, -1)),
    ("logsumexp", lambda x: F.logsumexp(x, -1)),
    ("token_logprobs", lambda x: F.token_logprobs(x, np.zeros(2, dtype=np.int64))),
])
def test_normalising_over_an_empty_axis_is_an_error_that_names_the_op(name, call):
    with pytest.raises(ValueError, match=rf"{name}: cannot reduce over an empty axis -1 of shape \(2, 0\)"):
        call(Tensor(np.ones((2, 0))))


def test_attention_over_no_keys_is_an_error_that_names_the_op():
    q = Tensor(np.ones((2, 3, 4)))
    empty = Tensor(np.ones((2, 0, 4)))
    with pytest.raises(ValueError, match=r"scaled_dot_product_attention: k \(2, 0, 4\) and v \(2, 0, 4\) hold no "
                                         r"positions \(S = 0\)"):
        F.scaled_dot_product_attention(q, empty, empty)


def log1mexp_reference(x):
    """log(1 − e^x) in 50-digit decimal arithmetic."""
    getcontext().prec = 50
    return float((1 - Decimal(x).exp()).ln())


@pytest.mark.parametrize("x", [-1e-8, -1e-12, -1e-5, -0.1, -math.log(2), -0.7, -1.0, -5.0, -40.0, -700.0])
def test_log1mexp_matches_a_50_digit_reference_near_zero_and_far_from_it(x):
    got = F.log1mexp(Tensor(np.array([x]), dtype=np.float64)).numpy()[0]
    assert got == pytest.approx(log1mexp_reference(x), rel=1e-14, abs=1e-300)


@given(st.floats(-50, -1e-6))
def test_log1mexp_gradient_is_minus_one_over_expm1_of_minus_x(x):
    leaf = Tensor(np.array([x]), requires_grad=True, dtype=np.float64)
    F.log1mexp(leaf).sum().backward()
    assert leaf.grad[0] == pytest.approx(-1 / math.expm1(-x), rel=1e-12)


@given(st.one_of(st.floats(-50, 50), st.floats(-1e-6, 1e-6)), st.sampled_from([np.float32, np.float64]))
def test_k3_is_nonnegative_finite_and_accurate_near_zero(x, dtype):
    """expm1(x) − x errs by at most a rounding of x; exp(x) − 1 − x errs by a rounding of 1."""
    out = F.k3(Tensor(np.array([x]), dtype=dtype)).numpy()[0]
    assert np.isfinite(out) and out >= 0
    if abs(x) < 1e-3 and dtype == np.float64:
        assert out == pytest.approx(x * x / 2 + x ** 3 / 6 + x ** 4 / 24, rel=1e-9, abs=abs(x) * 2.3e-16)


def test_logsumexp_of_1e10_is_finite_and_exact():
    x = Tensor(np.full((2, 4), 1e10), requires_grad=True, dtype=np.float64)
    out = F.logsumexp(x, axis=-1)
    out.sum().backward()
    np.testing.assert_allclose(out.numpy(), 1e10 + np.log(4), rtol=0, atol=1e-5)
    np.testing.assert_allclose(x.grad, np.full((2, 4), 0.25))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_softplus_log_sigmoid_stay_finite_at_extremes(device, dtype):
    x = np.array([-1e4, -1000.0, 1000.0, 1e4])
    for fn in (F.sigmoid, F.softplus, F.log_sigmoid):
        out, grad = _value_and_grad(fn, x, device, dtype)
        assert np.isfinite(out).all() and np.isfinite(grad).all(), fn.__name__
    sig, dsig = _value_and_grad(F.sigmoid, x, device, dtype)
    np.testing.assert_array_equal(sig, [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(dsig, [0.0, 0.0, 0.0, 0.0])
    sp, dsp = _value_and_grad(F.softplus, x, device, dtype)
    np.testing.assert_allclose(sp, [0.0, 0.0, 1000.0, 1e4])
    np.testing.assert_allclose(dsp, [0.0, 0.0, 1.0, 1.0])


def test_log_sigmoid_is_exact_up_to_1e4():
    x = np.array([-1e4, -1000.0, -50.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 50.0, 700.0, 1000.0, 1e4])
    # closed forms in float64: log σ(x) = −log1p(e^−x) for x ≥ 0, x − log1p(eˣ) for x < 0
    expected = np.where(x >= 0, -np.log1p(np.exp(-np.abs(x))), x - np.log1p(np.exp(-np.abs(x))))
    out, grad = _value_and_grad(F.log_sigmoid, x, "cpu")
    np.testing.assert_allclose(out, expected, rtol=1e-15, atol=0)
    assert out[0] == -1e4 and out[-1] == -np.exp(-1e4)   # −e^−10000 underflows to −0.0: the exact float
    assert out[-3] == -np.exp(-700.0)                    # a tiny negative, not rounded to 0
    np.testing.assert_allclose(grad, np.exp(-np.logaddexp(0.0, x)), rtol=1e-15)   # σ(−x)


def test_fully_masked_attention_rows_give_zeros_and_no_gradient(device):
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.standard_normal(s), requires_grad=True, dtype=np.float64, device=device)
               for s in [(2, 3, 4), (2, 5, 4), (2, 5, 4)])
    allowed = np.ones((3, 5), dtype=bool)
    allowed[1] = False
    out = F.scaled_dot_product_attention(q, k, v, q.xp.asarray(allowed))
    out.sum().backward()
    got = out.numpy()
    assert np.isfinite(got).all() and (got[:, 1] == 0).all() and (got[:, [0, 2]] != 0).all()
    assert (backend.to_numpy(q.grad)[:, 1] == 0).all()
    assert np.isfinite(backend.to_numpy(k.grad)).all() and np.isfinite(backend.to_numpy(v.grad)).all()


def test_causal_attention_with_more_queries_than_keys_zeroes_the_rows_that_see_no_key(device):
    rng = np.random.default_rng(0)
    q = Tensor(rng.standard_normal((4, 2)), device=device)
    kv = Tensor(rng.standard_normal((2, 2)), device=device)
    out = F.scaled_dot_product_attention(q, kv, kv, is_causal=True).numpy()   # query i sees keys j <= i − 2
    assert (out[:2] == 0).all() and (out[2:] != 0).all()


def test_causal_attention_of_a_block_after_a_cache_equals_the_last_rows_of_the_full_pass(device):
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.standard_normal((2, 6, 4)), dtype=np.float64, device=device) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True).numpy()
    block = F.scaled_dot_product_attention(q[:, 4:], k, v, is_causal=True).numpy()
    np.testing.assert_allclose(block, full[:, 4:], rtol=1e-12)


def test_cross_entropy_with_every_position_masked_is_zero_with_zero_gradient(device):
    logits = Tensor(np.random.default_rng(0).standard_normal((2, 3, 5)), requires_grad=True, device=device)
    targets = logits.xp.asarray(np.array([[1, 2, -100], [-100, 0, 4]]))
    loss = F.cross_entropy(logits, targets, mask=logits.xp.zeros((2, 3)))
    loss.backward()
    assert loss.item() == 0.0
    assert (backend.to_numpy(logits.grad) == 0).all()
    all_ignored = F.cross_entropy(logits, logits.xp.full((2, 3), -100))
    assert all_ignored.item() == 0.0


def test_cross_entropy_honours_a_custom_ignore_index():
    rng = np.random.default_rng(0)
    logits = Tensor(rng.standard_normal((4, 3)), dtype=np.float64)
    targets = np.array([0, 7, 2, 7])
    loss = F.cross_entropy(logits, targets, ignore_index=7).item()
    expected = -F.token_logprobs(logits, np.array([0, 0, 2, 0])).numpy()[[0, 2]].mean()
    assert loss == pytest.approx(expected, rel=1e-12)


def test_tied_maxima_share_the_gradient_as_in_torch():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True, dtype=np.float64)
    x.max(axis=1).sum().backward()          # torch.amax splits the gradient evenly among the maxima
    np.testing.assert_allclose(x.grad, [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    a = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True, dtype=np.float64)
    b = Tensor(np.array([2.0, 2.0, 2.0]), requires_grad=True, dtype=np.float64)
    (F.maximum(a, b) + 10 * F.minimum(a, b)).sum().backward()   # torch.maximum/minimum: half each at a tie
    np.testing.assert_allclose(a.grad, [10, 5.5, 1])
    np.testing.assert_allclose(b.grad, [1, 5.5, 10])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 ** −1 = inf inside the discarded branch
def test_a_zero_exponent_has_zero_gradient_even_at_zero_as_in_torch():
    x = Tensor(np.array([0.0, 2.0]), requires_grad=True, dtype=np.float64)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0])
    x = Tensor(np.array([0.0, 2.0]), requires_grad=True, dtype=np.float64)
    p = Tensor(np.array([0.0, 1.0]), requires_grad=True, dtype=np.float64)
    (x ** p).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 1.0])
    np.testing.assert_allclose(p.grad, [0.0, 2 * np.log(2)])


def test_clip_passes_the_gradient_on_its_bounds_as_torch_clamp():
    x = Tensor(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), requires_grad=True, dtype=np.float64)
    F.clip(x, -1.0, 1.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0, 1, 1, 1, 0])


# --------------------------------------------------------------- dropout
def test_dropout_keeps_a_fraction_1_minus_p_scaled_by_its_inverse(device):
    x = Tensor(np.ones((200, 100)), requires_grad=True, device=device)
    gen = x.xp.random.default_rng(0)
    out = F.dropout(x, 0.25, training=True, generator=gen)
    out.sum().backward()
    kept = backend.to_numpy(out.data) != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(backend.to_numpy(out.data)[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(backend.to_numpy(x.grad), backend.to_numpy(out.data))   # gradient = mask / (1 − p)


def test_dropout_is_the_identity_when_not_training_or_p_is_zero():
    x = Tensor(np.ones(5))
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x


def test_dropout_masks_repeat_under_manual_seed():
    x = Tensor(np.ones(1000))
    minirlhf.manual_seed(3)
    first = F.dropout(x, 0.5).numpy()
    second = F.dropout(x, 0.5).numpy()
    minirlhf.manual_seed(3)
    np.testing.assert_array_equal(F.dropout(x, 0.5).numpy(), first)
    assert (first != second).any()


@pytest.mark.parametrize("shape, transpose", [((3, 70, 200), False), ((3, 70, 200), True), ((), False),
                                              ((1 << 15,), False)])
def test_gelu_over_several_slices_equals_its_formula_and_derivative(shape, transpose):
    """GELU runs in slices of F._GELU_SLICE elements: a ragged last slice, a strided input, a 0-d input and
    exactly one slice give the formula's values and derivative at every element (float64)."""
    rng = np.random.default_rng(3)
    data = rng.standard_normal(shape[::-1] if transpose else shape) * 3
    data = data.T if transpose else data
    x = Tensor(data, requires_grad=True, dtype=np.float64)
    g = rng.standard_normal(shape)
    y = F.gelu(x)
    y.backward(g)
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (data + 0.044715 * data ** 3))
    np.testing.assert_allclose(y.data, 0.5 * data * (1 + t), rtol=1e-13, atol=1e-15)
    slope = 0.5 * (1 + t) + 0.5 * data * (1 - t * t) * c * (1 + 3 * 0.044715 * data ** 2)
    np.testing.assert_allclose(x.grad, g * slope, rtol=1e-12, atol=1e-14)
    assert y.shape == shape and x.grad.shape == shape
