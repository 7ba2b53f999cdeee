"""Differentiable ops. Each op computes its forward and, right below it, the
``backward(g)`` closure that maps the output gradient ``g`` to one gradient
per input (the engine sums them back over broadcast axes).

Axes are spelled ``axis`` (NumPy's word for PyTorch's ``dim``); otherwise the
names and call shapes follow ``torch.nn.functional``.
"""
import builtins
import math
import numbers

import numpy as np

from . import backend
from .kernels import attention as fused_attention, logprobs as fused_logprobs, reference as kernel_reference
from .tensor import Scattered, Tensor


# ---------------------------------------------------------------- helpers
def _tensor(x, like, op):
    """``x`` as a Tensor on ``like``'s device. Constants (numbers, arrays) take ``like``'s
    float dtype, so a float64 graph stays float64 and a float32 one float32."""
    if isinstance(x, Tensor):
        if x.device != like.device:
            raise RuntimeError(f"{op}: inputs are on different devices ({like.device} and {x.device}); "
                               "move one with .to(device) first")
        return x
    if not (isinstance(x, np.ndarray) or backend.is_cupy_array(x)):
        x = np.asarray(x)
        if x.ndim == 0 and like.device == "cuda":
            # a fill kernel, not a host→device copy (which can wait for the GPU) for every constant
            x = like.xp.full((), x.item(), dtype=x.dtype)
    if backend.device_of(x) != like.device:
        raise RuntimeError(f"{op}: got a {backend.device_of(x)} array with a {like.device} tensor; "
                           "move one with .to(device) first")
    if like.dtype.kind == "f":
        dtype = like.dtype
    else:
        dtype = None if x.dtype.kind == "f" else x.dtype
    return Tensor(like.xp.asarray(x), dtype=dtype)


def _row_means(a):
    """The mean of each row of a 2-D array, shape (rows, 1), as the product a @ (1/n, …, 1/n).

    A BLAS matrix-vector product: on NumPy it takes a fifth of the time of ``a.mean(axis=1)``, which
    reduces each short row on its own ((2048, 128) float32: 19 vs 103 µs).
    """
    return (a @ backend.get_array_module(a).full(a.shape[1], 1.0 / a.shape[1], dtype=a.dtype))[:, None]


def _column_sums(a):
    """The sum of a 2-D array's rows, shape (columns,), as the product (1, …, 1) @ a: a third of the
    time of ``a.sum(axis=0)`` on NumPy ((2048, 128) float32: 17 vs 57 µs)."""
    return backend.get_array_module(a).ones(a.shape[0], dtype=a.dtype) @ a


def _pair(a, b, op):
    if not isinstance(a, Tensor):
        a = _tensor(a, b, op)
    b = _tensor(b, a, op)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: cannot broadcast shapes {a.shape} and {b.shape}; expected each trailing "
                         "dimension to be equal or 1") from None
    return a, b


def _int_index(ids, op, name="index"):
    data = ids.data if isinstance(ids, Tensor) else ids
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
        data = np.asarray(data)
    if data.dtype.kind not in "iu":
        raise TypeError(f"{op}: {name} must be an integer array, got dtype {data.dtype}")
    return data


def _normalize_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    return tuple(a % ndim for a in axes)


def _check_reduced_axis(x, axis, op):
    if x.ndim == 0 or any(x.shape[a] == 0 for a in _normalize_axis(axis, x.ndim)):
        raise ValueError(f"{op}: cannot reduce over an empty axis {axis} of shape {x.shape}; "
                         "expected at least one entry")


# -------------------------------------------------------------- arithmetic
def add(a, b):
    a, b = _pair(a, b, "add")
    return Tensor._from_op(a.data + b.data, (a, b), lambda g: (g, g), "add")


def sub(a, b):
    a, b = _pair(a, b, "sub")
    return Tensor._from_op(a.data - b.data, (a, b), lambda g: (g, -g), "sub")


def mul(a, b):
    a, b = _pair(a, b, "mul")

    def backward(g):
        return (g * b.data if a.requires_grad else None,
                g * a.data if b.requires_grad else None)
    return Tensor._from_op(a.data * b.data, (a, b), backward, "mul")


def div(a, b):
    a, b = _pair(a, b, "div")
    out = a.data / b.data

    def backward(g):
        return (g / b.data if a.requires_grad else None,
                -g * out / b.data if b.requires_grad else None)
    return Tensor._from_op(out, (a, b), backward, "div")


def neg(a):
    return Tensor._from_op(-a.data, (a,), lambda g: (-g,), "neg")


def pow(a, exponent):
    """a ** exponent; d/da = p a^(p-1), d/dp = a^p log a."""
    if isinstance(exponent, numbers.Number) and isinstance(a, Tensor):
        p = exponent
        out = a.data ** p
        # p = 0: the derivative is 0 everywhere, also at a = 0 where p·a^(p−1) would be 0·inf
        return Tensor._from_op(out, (a,), lambda g: (g * p * a.data ** (p - 1) if p != 0 else g * 0,), "pow")
    a, b = _pair(a, exponent, "pow")
    out = a.data ** b.data

    def backward(g):
        xp = a.xp
        return (g * xp.where(b.data == 0, 0, b.data * a.data ** (b.data - 1)) if a.requires_grad else None,
                g * out * xp.log(xp.where(a.data > 0, a.data, 1)) if b.requires_grad else None)
    return Tensor._from_op(out, (a, b), backward, "pow")


def matmul(a, b):
    """a @ b, batched and broadcast over leading axes (1-d inputs as in NumPy)."""
    if not isinstance(a, Tensor):
        a = _tensor(a, b, "matmul")
    b = _tensor(b, a, "matmul")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: inputs must have at least 1 dimension, got shapes {a.shape} and {b.shape}")
    ka = a.shape[-1]
    kb = b.shape[-2] if b.ndim > 1 else b.shape[0]
    if ka != kb:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align: a.shape[-1]={ka} must equal "
                         f"b.shape[-2]={kb}")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch shapes {a.shape[:-2]} and {b.shape[:-2]} of inputs {a.shape} and "
                         f"{b.shape} cannot broadcast") from None
    xp = a.xp

    def backward(g):
        A = a.data[None, :] if a.ndim == 1 else a.data
        B = b.data[:, None] if b.ndim == 1 else b.data
        G = g
        if a.ndim == 1:
            G = G[..., None, :] if b.ndim > 1 else G[None]
        if b.ndim == 1:
            G = G[..., None]
        ga = xp.matmul(G, xp.swapaxes(B, -1, -2)) if a.requires_grad else None
        gb = xp.matmul(xp.swapaxes(A, -1, -2), G) if b.requires_grad else None
        if ga is not None and a.ndim == 1:
            ga = ga.reshape(-1, a.shape[0]).sum(0)
        if gb is not None and b.ndim == 1:
            gb = gb.reshape(-1, b.shape[0]).sum(0)
        return ga, gb
    return Tensor._from_op(xp.matmul(a.data, b.data), (a, b), backward, "matmul")


# -------------------------------------------------------------- reductions
def sum(x, axis=None, keepdims=False):
    xp = x.xp
    axes = _normalize_axis(axis, x.ndim)

    def backward(g):
        if not keepdims:
            g = xp.expand_dims(g, axes)
        return (xp.broadcast_to(g, x.shape),)
    return Tensor._from_op(x.data.sum(axis=axes, keepdims=keepdims), (x,), backward, "sum")


def mean(x, axis=None, keepdims=False):
    axes = _normalize_axis(axis, x.ndim)
    n = math.prod(x.shape[a] for a in axes)
    return sum(x, axes, keepdims) * (1.0 / builtins.max(n, 1))


def max(x, axis=None, keepdims=False):
    """Maximum along ``axis`` (like torch.amax: tied maxima share the gradient evenly)."""
    xp = x.xp
    axes = _normalize_axis(axis, x.ndim)
    if any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"max: cannot reduce over an empty axis of shape {x.shape}")
    m = x.data.max(axis=axes, keepdims=True)

    def backward(g):
        if not keepdims:
            g = xp.expand_dims(g, axes)
        is_max = (x.data == m).astype(g.dtype)
        return (g * is_max / is_max.sum(axis=axes, keepdims=True),)
    out = m if keepdims else m.squeeze(axis=axes)
    return Tensor._from_op(out, (x,), backward, "max")


def logsumexp(x, axis=-1, keepdims=False):
    """log Σ exp(x) along ``axis``, with the maximum subtracted first (finite for |x| up to 1e10)."""
    _check_reduced_axis(x, axis, "logsumexp")
    xp = x.xp
    axes = _normalize_axis(axis, x.ndim)
    m = x.data.max(axis=axes, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    e = xp.exp(x.data - m)
    s = e.sum(axis=axes, keepdims=True)
    out = xp.log(s) + m

    def backward(g):
        if not keepdims:
            g = xp.expand_dims(g, axes)
        return (g * e / s,)
    return Tensor._from_op(out if keepdims else out.squeeze(axis=axes), (x,), backward, "logsumexp")


# ------------------------------------------------------------- elementwise
def exp(x):
    out = x.xp.exp(x.data)
    return Tensor._from_op(out, (x,), lambda g: (g * out,), "exp")


def log(x):
    return Tensor._from_op(x.xp.log(x.data), (x,), lambda g: (g / x.data,), "log")


def sqrt(x):
    out = x.xp.sqrt(x.data)
    return Tensor._from_op(out, (x,), lambda g: (g * 0.5 / out,), "sqrt")


def abs(x):
    xp = x.xp
    return Tensor._from_op(xp.abs(x.data), (x,), lambda g: (g * xp.sign(x.data),), "abs")


def tanh(x):
    out = x.xp.tanh(x.data)
    return Tensor._from_op(out, (x,), lambda g: (g * (1 - out * out),), "tanh")


def _sigmoid(xp, z):
    """σ(z) = 1/(1+e^-z) without overflow: e^-|z| is always <= 1."""
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid(x):
    out = _sigmoid(x.xp, x.data)
    return Tensor._from_op(out, (x,), lambda g: (g * out * (1 - out),), "sigmoid")


def log_sigmoid(x):
    """log σ(x) = min(x, 0) − log(1 + e^−|x|): finite and exact for |x| up to 1e4 and beyond."""
    xp = x.xp
    out = xp.minimum(x.data, 0) - xp.log1p(xp.exp(-xp.abs(x.data)))
    return Tensor._from_op(out, (x,), lambda g: (g * _sigmoid(xp, -x.data),), "log_sigmoid")


def softplus(x):
    """log(1 + e^x) = max(x, 0) + log(1 + e^−|x|)."""
    xp = x.xp
    out = xp.maximum(x.data, 0) + xp.log1p(xp.exp(-xp.abs(x.data)))
    return Tensor._from_op(out, (x,), lambda g: (g * _sigmoid(xp, x.data),), "softplus")


def k3(x):
    """e^x − 1 − x, Schulman's k3 estimator of KL(π ‖ π_ref) as a function of x = log(π_ref/π)
    (Schulman 2020, "Approximating KL divergence"). expm1 keeps it accurate (and >= 0) near x = 0,
    where exp(x) − 1 − x cancels to noise or even goes negative. d/dx = expm1(x)."""
    em1 = x.xp.expm1(x.data)
    return Tensor._from_op(em1 - x.data, (x,), lambda g: (g * em1,), "k3")


def log1mexp(x):
    """log(1 − e^x) for x < 0 without cancellation (Mächler 2012, "Accurately computing
    log(1 − exp(−|a|))"): log(−expm1(x)) for x > −log 2, log1p(−e^x) below. d/dx = −1/expm1(−x)."""
    xp = x.xp
    d = x.data
    tiny = np.finfo(d.dtype).tiny
    out = xp.where(d > -math.log(2), xp.log(-xp.expm1(xp.minimum(d, -tiny))),
                   xp.log1p(-xp.exp(xp.minimum(d, -math.log(2)))))
    return Tensor._from_op(out, (x,), lambda g: (-g / xp.expm1(-d),), "log1mexp")


def relu(x):
    return Tensor._from_op(x.xp.maximum(x.data, 0), (x,), lambda g: (g * (x.data > 0),), "relu")


_GELU_C = math.sqrt(2.0 / math.pi)
# GELU runs its passes slice by slice, 2^15 elements (128 KB of float32) at a time, so that a slice's
# x, t and result stay in the core's L2 cache from one pass to the next instead of streaming each
# pass through memory. Measured on the 2-core Intel Xeon machine (2 MB L2 a core), the same values to
# the bit, old and new alternating: the train-step benchmark's step 0.929x the time with two BLAS threads
# (142.9 → 132.7 ms) and 0.973x with one; vs_trl.py's PPO step at 4L/256d, 809 / 761 → 717 / 718 ms;
# its DPO step 260 → 248 ms. (On the AMD EPYC machine, 1 MB L2, slices of 2^14–2^16 had made the train
# step 1.01x–1.02x slower.) On a GPU each pass is one kernel over the whole array.
_GELU_SLICE = 1 << 15


def _slices(n, xp):
    if xp is not np:
        return [slice(None)]
    return [slice(i, i + _GELU_SLICE) for i in range(0, n, _GELU_SLICE)]


def gelu(x):
    """GPT-2's GELU: ½ x (1 + t), t = tanh(√(2/π) (x + 0.044715 x³)) = tanh(√(2/π) x (1 + 0.044715 x²)).

    d/dx = ½ (1 + t) + ½ x (1 − t²) √(2/π) (1 + 3 · 0.044715 x²).
    """
    xp = x.xp
    d = xp.ascontiguousarray(x.data).reshape(-1)
    t, out = xp.empty_like(d), xp.empty_like(d)
    slices = _slices(d.size, xp)
    for s in slices:
        _gelu_forward(xp, d[s], t[s], out[s])

    def backward(g):
        g = xp.ascontiguousarray(g).reshape(-1)
        slope = xp.empty_like(d)
        factor = xp.empty_like(d[slices[0]] if slices else d)  # the first (largest) slice's scratch, reused
        for s in slices:
            _gelu_backward(xp, d[s], t[s], g[s], slope[s], factor[:slope[s].size])
        return (slope.reshape(x.shape),)
    return Tensor._from_op(out.reshape(x.shape), (x,), backward, "gelu")


def _gelu_forward(xp, d, t, out):
    """out = GELU(d), and t = tanh(√(2/π) d (1 + 0.044715 d²)) kept for the backward.

    Each formula runs in place on buffers the op owns (x² as d * d: NumPy's d ** 3 calls powf per element):
    one temporary of x's size where the plain expressions made nine. On the train-step benchmark's
    (16, 128, 512) activations, forward + backward went from 15.0 to 3.0 ms; with the scalars folded and
    the derivative factored (below), from 3.0 to 2.8 ms.
    """
    xp.multiply(d, d, out=t)
    t *= 0.044715 * _GELU_C
    t += _GELU_C
    t *= d                                         # √(2/π) x (1 + 0.044715 x²)
    xp.tanh(t, out=t)
    xp.add(t, 1, out=out)
    out *= d
    out *= 0.5


def _gelu_backward(xp, d, t, g, slope, factor):
    """slope = g · GELU'(d), with ``factor`` as scratch; the same derivative as
    (1 + t) · (½ + ½ x (1 − t) √(2/π) (1 + 3 · 0.044715 x²)): 10 passes, not 12."""
    xp.multiply(d, d, out=slope)
    slope *= 1.5 * 0.044715 * _GELU_C
    slope += 0.5 * _GELU_C
    slope *= d                                     # ½ x √(2/π) (1 + 3 · 0.044715 x²)
    xp.subtract(1, t, out=factor)
    slope *= factor
    slope += 0.5
    slope *= xp.add(t, 1, out=factor)
    slope *= g


def softmax(x, axis=-1):
    _check_reduced_axis(x, axis, "softmax")
    xp = x.xp
    p = x.data - x.data.max(axis=axis, keepdims=True)  # exp and the division in place on this buffer
    xp.exp(p, out=p)
    p /= p.sum(axis=axis, keepdims=True)

    def backward(g):
        gx = g * p
        gx -= p * gx.sum(axis=axis, keepdims=True)  # p (g − Σ g p)
        return (gx,)
    return Tensor._from_op(p, (x,), backward, "softmax")


def log_softmax(x, axis=-1):
    """x − logsumexp(x): the maximum is subtracted first, so logits of ±1e4 stay finite."""
    _check_reduced_axis(x, axis, "log_softmax")
    xp = x.xp
    out = x.data - x.data.max(axis=axis, keepdims=True)
    out -= xp.log(xp.exp(out).sum(axis=axis, keepdims=True))

    def backward(g):
        gx = xp.exp(out)
        gx *= -g.sum(axis=axis, keepdims=True)
        gx += g
        return (gx,)
    return Tensor._from_op(out, (x,), backward, "log_softmax")


def astype(x, dtype):
    """Cast to ``dtype``; the gradient is cast back."""
    src = x.dtype
    return Tensor._from_op(x.data.astype(dtype), (x,), lambda g: (g.astype(src),), "astype")


def to_device(x, device):
    src = x.device
    return Tensor._from_op(backend.to_device(x.data, device), (x,),
                           lambda g: (backend.to_device(g, src),), "to_device")


# ------------------------------------------------------------------ shapes
def reshape(x, shape):
    shape = tuple(shape)
    try:
        out = x.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape shape {x.shape} ({x.size} elements) into {shape}") from None
    return Tensor._from_op(out, (x,), lambda g: (g.reshape(x.shape),), "reshape")


def transpose(x, axis0, axis1):
    return Tensor._from_op(x.xp.swapaxes(x.data, axis0, axis1), (x,),
                           lambda g: (x.xp.swapaxes(g, axis0, axis1),), "transpose")


def permute(x, axes):
    axes = tuple(a % x.ndim for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"permute: axes {axes} are not a permutation of range({x.ndim}) for shape {x.shape}")
    inverse = tuple(np.argsort(axes))
    return Tensor._from_op(x.data.transpose(axes), (x,), lambda g: (g.transpose(inverse),), "permute")


def unsqueeze(x, axis):
    return reshape(x, x.xp.expand_dims(x.data, axis).shape)


def squeeze(x, axis):
    if x.shape[axis] != 1:
        raise ValueError(f"squeeze: axis {axis} of shape {x.shape} has size {x.shape[axis]}, expected 1")
    return reshape(x, x.xp.squeeze(x.data, axis).shape)


def expand(x, shape):
    """Broadcast ``x`` to ``shape`` (a view; the gradient is summed back)."""
    shape = tuple(x.shape[i - len(shape) + x.ndim] if n == -1 else n for i, n in enumerate(shape))
    try:
        out = x.xp.broadcast_to(x.data, shape)
    except ValueError:
        raise ValueError(f"expand: cannot broadcast shape {x.shape} to {shape}") from None
    return Tensor._from_op(out, (x,), lambda g: (g,), "expand")


def _is_basic_key(key):
    """True for keys that select each element at most once: ints, slices, None, Ellipsis and
    boolean masks (only integer arrays can repeat an element)."""
    items = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (slice, numbers.Integral))
               or getattr(k, "dtype", None) == bool for k in items)


def index(x, key):
    """x[key] for ints, slices, None, Ellipsis and integer or boolean arrays.

    Backward scatters ``g`` into zeros; with integer arrays repeated positions accumulate.
    """
    items = key if isinstance(key, tuple) else (key,)
    items = tuple(k.data if isinstance(k, Tensor) else k for k in items)
    for k in items:
        if (isinstance(k, np.ndarray) or backend.is_cupy_array(k)) and backend.device_of(k) != x.device:
            raise RuntimeError(f"index: index array is on {backend.device_of(k)}, tensor on {x.device}")
        if hasattr(k, "dtype") and k.dtype.kind not in "iub":
            raise TypeError(f"index: index arrays must be integer or boolean, got dtype {k.dtype}")
    key = items if isinstance(key, tuple) else items[0]
    try:
        out = x.data[key]
    except IndexError as e:
        raise IndexError(f"index: {e} (tensor shape {x.shape})") from None
    basic = _is_basic_key(key)

    def backward(g):
        if basic:
            return (Scattered(key, g),)
        grad = x.xp.zeros(x.shape, dtype=g.dtype)
        backend.scatter_add(grad, key, g)
        return (grad,)
    return Tensor._from_op(out, (x,), backward, "index")


def gather(x, axis, index):
    """out[..., i, ...] = x[..., index[..., i, ...], ...] along ``axis`` (torch.gather).

    As in torch, ``index`` has x's number of axes and may be smaller than x along the others.
    """
    idx = _int_index(index, "gather")
    if backend.device_of(idx) != x.device:
        raise RuntimeError(f"gather: index is on {backend.device_of(idx)}, input on {x.device}")
    xp = x.xp
    axis = axis % x.ndim
    if idx.ndim != x.ndim or any(i != axis and n > m for i, (n, m) in enumerate(zip(idx.shape, x.shape))):
        raise ValueError(f"gather: index of shape {idx.shape} does not fit input of shape {x.shape}; expected "
                         f"{x.ndim} axes, each no longer than the input's except axis {axis}")
    # the range check reads the indices back to the host; on CuPy it is skipped (out-of-range indices wrap)
    if idx.size and not backend.is_cupy_array(idx) and (idx.min() < 0 or idx.max() >= x.shape[axis]):
        raise IndexError(f"gather: index values must lie in [0, {x.shape[axis]}) for axis {axis} of shape "
                         f"{x.shape}, got min {int(idx.min())} max {int(idx.max())}")
    key = list(xp.ix_(*[xp.arange(n) for n in idx.shape]))
    key[axis] = idx
    key = tuple(key)

    def backward(g):
        grad = xp.zeros(x.shape, dtype=g.dtype)
        backend.scatter_add(grad, key, g)
        return (grad,)
    return Tensor._from_op(x.data[key], (x,), backward, "gather")


def embedding(ids, weight):
    """weight[ids]: rows of the embedding table; backward scatter-adds (repeated ids accumulate)."""
    idx = _int_index(ids, "embedding", "ids")
    if backend.device_of(idx) != weight.device:
        raise RuntimeError(f"embedding: ids are on {backend.device_of(idx)}, weight on {weight.device}")
    num = weight.shape[0]
    # the range check reads the ids back to the host; on CuPy it is skipped (out-of-range ids wrap)
    if idx.size and not backend.is_cupy_array(idx) and (idx.min() < 0 or idx.max() >= num):
        raise IndexError(f"embedding: ids must lie in [0, {num}) for a table of shape {weight.shape}, got "
                         f"min {int(idx.min())} max {int(idx.max())}")
    xp = weight.xp

    def backward(g):
        grad = xp.zeros(weight.shape, dtype=g.dtype)
        backend.scatter_add(grad, idx.reshape(-1), g.reshape(-1, weight.shape[1]))
        return (grad,)
    return Tensor._from_op(weight.data[idx], (weight,), backward, "embedding")


def _mask_array(mask, like, op):
    m = mask.data if isinstance(mask, Tensor) else mask
    if not (isinstance(m, np.ndarray) or backend.is_cupy_array(m)):
        m = like.xp.asarray(m)  # Python bools and lists belong to no device yet
    if backend.device_of(m) != like.device:
        raise RuntimeError(f"{op}: mask is on {backend.device_of(m)}, input on {like.device}")
    try:
        np.broadcast_shapes(m.shape, like.shape)
    except ValueError:
        raise ValueError(f"{op}: mask of shape {m.shape} does not broadcast to input shape {like.shape}") from None
    return m.astype(bool, copy=False)


def masked_fill(x, mask, value):
    """x with ``value`` wherever ``mask`` is true; no gradient flows to filled positions."""
    m = _mask_array(mask, x, "masked_fill")
    xp = x.xp
    return Tensor._from_op(xp.where(m, xp.asarray(value, dtype=x.dtype), x.data), (x,),
                           lambda g: (xp.where(m, 0, g),), "masked_fill")


def where(cond, a, b):
    """a where cond, else b (a and b may be numbers)."""
    like = a if isinstance(a, Tensor) else b
    if not isinstance(like, Tensor):
        raise TypeError("where: at least one of a, b must be a Tensor")
    a, b = _pair(a, b, "where")
    c = _mask_array(cond, a, "where")
    xp = a.xp
    return Tensor._from_op(xp.where(c, a.data, b.data), (a, b),
                           lambda g: (xp.where(c, g, 0), xp.where(c, 0, g)), "where")


def cat(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    first = tensors[0]
    tensors = [_tensor(t, first, "cat") for t in tensors]
    ref = list(first.shape)
    ax = axis % first.ndim
    for t in tensors:
        if t.ndim != first.ndim or [n for i, n in enumerate(t.shape) if i != ax] != \
                [n for i, n in enumerate(ref) if i != ax]:
            raise ValueError(f"cat: shapes {[t.shape for t in tensors]} differ outside axis {axis}")
    xp = first.xp
    bounds = np.cumsum([t.shape[ax] for t in tensors])[:-1]
    return Tensor._from_op(xp.concatenate([t.data for t in tensors], axis=ax), tuple(tensors),
                           lambda g: tuple(xp.split(g, bounds, axis=ax)), "cat")


def stack(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: expected a non-empty sequence of tensors")
    tensors = [_tensor(t, tensors[0], "stack") for t in tensors]
    if len({t.shape for t in tensors}) != 1:
        raise ValueError(f"stack: all tensors must have the same shape, got {[t.shape for t in tensors]}")
    xp = tensors[0].xp
    ax = axis % (tensors[0].ndim + 1)
    return Tensor._from_op(xp.stack([t.data for t in tensors], axis=ax), tuple(tensors),
                           lambda g: tuple(xp.moveaxis(g, ax, 0)), "stack")


def clip(x, min=None, max=None):
    """Clamp to [min, max]; the gradient passes where min <= x <= max (as torch.clamp)."""
    xp = x.xp
    lo = -np.inf if min is None else min
    hi = np.inf if max is None else max
    inside = (x.data >= lo) & (x.data <= hi)
    return Tensor._from_op(xp.clip(x.data, lo, hi).astype(x.dtype, copy=False), (x,),
                           lambda g: (g * inside,), "clip")


def maximum(a, b):
    """Elementwise max; at ties each input gets half the gradient (as torch.maximum)."""
    a, b = _pair(a, b, "maximum")
    xp = a.xp
    wa = ((a.data > b.data) + 0.5 * (a.data == b.data)).astype(a.dtype)
    return Tensor._from_op(xp.maximum(a.data, b.data), (a, b), lambda g: (g * wa, g * (1 - wa)), "maximum")


def minimum(a, b):
    """Elementwise min; at ties each input gets half the gradient (as torch.minimum)."""
    a, b = _pair(a, b, "minimum")
    xp = a.xp
    wa = ((a.data < b.data) + 0.5 * (a.data == b.data)).astype(a.dtype)
    return Tensor._from_op(xp.minimum(a.data, b.data), (a, b), lambda g: (g * wa, g * (1 - wa)), "minimum")


# --------------------------------------------------------- network layers
def linear(x, weight, bias=None):
    """x @ weightᵀ + bias, with weight of shape (out_features, in_features).

    Leading axes are flattened to one, so forward and each gradient are a single matrix product
    (one BLAS call over all B·T rows rather than one per batch element plus a sum):
    dx = g W, dW = gᵀ x, db = Σ_rows g.
    """
    weight = _tensor(weight, x, "linear")
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} and weight of shape {weight.shape} do not fit; "
                         "expected weight (out_features, in_features) with in_features = input.shape[-1]")
    if bias is not None:
        bias = _tensor(bias, x, "linear")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"linear: bias has shape {bias.shape}, expected ({weight.shape[0]},)")
    x2 = x.data.reshape(-1, x.shape[-1])
    out = x2 @ weight.data.T
    if bias is not None:
        out += bias.data

    def backward(g):
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ weight.data).reshape(x.shape) if x.requires_grad else None
        gw = g2.T @ x2 if weight.requires_grad else None
        if bias is None:
            return gx, gw
        return gx, gw, (_column_sums(g2) if bias.requires_grad else None)
    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor._from_op(out.reshape(x.shape[:-1] + (weight.shape[0],)), parents, backward, "linear")


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(x − mean) / √(var + eps) · weight + bias over the trailing ``normalized_shape`` axes.

    Backward in closed form: with x̂ the normalised input and ĝ = g·weight,
    dx = (ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)) / √(var + eps).
    """
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    if x.shape[x.ndim - len(normalized_shape):] != normalized_shape:
        raise ValueError(f"layer_norm: input shape {x.shape} does not end with normalized_shape {normalized_shape}")
    xp = x.xp
    n = math.prod(normalized_shape)
    if n == 0:
        raise ValueError(f"layer_norm: normalized_shape {normalized_shape} holds no elements; expected at least one")
    x2 = x.data.reshape(-1, n)  # one row per normalised group
    # In place on the op's own buffers (xhat starts as x − mean): forward + backward of the train-step
    # benchmark's (16, 128, 128) layer norms went from 3.5 to 1.2 ms; the row means and column sums as
    # products with a vector (_row_means, _column_sums): 1.3 to 1.0 ms (old and new alternating, one thread).
    xhat = x2 - _row_means(x2)
    rstd = 1.0 / xp.sqrt(_row_means(xhat * xhat) + eps)
    xhat *= rstd
    out = xhat.reshape(x.shape)
    if weight is not None:
        out = out * weight.data
    if bias is not None:
        out = out + bias.data if weight is None else xp.add(out, bias.data, out=out)

    def backward(g):
        g2 = g.reshape(-1, n)
        gw = gb = gx = None
        if weight is not None and weight.requires_grad:
            gw = _column_sums(g2 * xhat).reshape(normalized_shape)
        if bias is not None and bias.requires_grad:
            gb = _column_sums(g2).reshape(normalized_shape)
        if x.requires_grad:
            gx = g2 * weight.data.reshape(-1) if weight is not None else g2.copy()  # ĝ, then dx in its place
            gh_xhat = gx * xhat
            mean_gh_xhat = _row_means(gh_xhat)
            gx -= _row_means(gx)
            gx -= xp.multiply(xhat, mean_gh_xhat, out=gh_xhat)
            gx *= rstd
            gx = gx.reshape(x.shape)
        return tuple(v for v, p in ((gx, x), (gw, weight), (gb, bias)) if p is not None)
    parents = tuple(p for p in (x, weight, bias) if p is not None)
    return Tensor._from_op(out, parents, backward, "layer_norm")


def dropout(x, p=0.1, training=True, generator=None):
    """Zero each element with probability p and scale the rest by 1/(1−p); identity when not training.

    The mask comes from ``generator`` (a NumPy/CuPy Generator) or the global
    one seeded by ``minirlhf.manual_seed``.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    rng = generator if generator is not None else backend.generator(x.device)
    keep = (rng.random(x.shape) >= p).astype(x.dtype) * (1.0 / (1 - p))
    return Tensor._from_op(x.data * keep, (x,), lambda g: (g * keep,), "dropout")


def _attention_mask(xp, T, S, is_causal, attn_mask, dtype):
    """Additive bias (…, T, S): 0 where a query may attend, −inf where it may not.

    Causal masks are aligned bottom-right (query i sees keys j <= i + S − T), so
    a query block decoded after a KV cache of S − T keys sees the whole cache.
    """
    bias = None
    if is_causal:
        i = xp.arange(T)[:, None]
        j = xp.arange(S)[None, :]
        bias = xp.where(j <= i + (S - T), 0.0, -np.inf).astype(dtype)
    if attn_mask is not None:
        m = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
        m = xp.where(m, 0.0, -np.inf).astype(dtype) if m.dtype == bool else m.astype(dtype)
        bias = m if bias is None else bias + m
    return bias


def scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """softmax(q kᵀ · scale + mask) v, for q (…, T, d), k (…, S, d), v (…, S, d_v).

    ``attn_mask``: boolean (True = may attend) or an additive float bias,
    broadcastable to (…, T, S). ``is_causal`` aligns the causal mask
    bottom-right (as FlashAttention-2). A query that may attend to nothing
    (a padding row) gets zeros, not NaN.

    Backward (P the probabilities, dO the output gradient):
    dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dP ∘ P)), dQ = dS K · scale, dK = dSᵀ Q · scale.
    On CuPy with a supported shape this dispatches to the fused kernel in ``minirlhf.kernels``.
    Otherwise causal attention runs over blocks of queries, each over only the keys it can see
    (:func:`_attend` forward, :func:`_attend_backward` backward).

    Grouped-query attention (Ainslie et al. 2023): k and v may have fewer heads than q,
    q (…, H, T, d) with k, v (…, H_kv, S, d) and H a multiple of H_kv; query head h reads K/V
    head h // (H / H_kv). The G = H / H_kv query heads of a group are stacked into one
    (G·T, d) block per K/V head, so every product runs on the K/V heads as they are, with no
    repeated copy, and dK, dV sum over the group within the same product.
    """
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"scaled_dot_product_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit; "
                         "expected q (..., T, d), k (..., S, d), v (..., S, d_v)")
    if k.shape[-2] == 0:
        raise ValueError(f"scaled_dot_product_attention: k {k.shape} and v {v.shape} hold no positions (S = 0); "
                         "the softmax over keys needs at least one")
    k = _tensor(k, q, "scaled_dot_product_attention")
    v = _tensor(v, q, "scaled_dot_product_attention")
    mask_device = None if attn_mask is None else backend.device_of(backend.array_of(attn_mask))
    if mask_device not in (None, q.device):
        raise RuntimeError(f"scaled_dot_product_attention: attn_mask is on {mask_device}, q on {q.device}")
    xp = q.xp
    T, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    m = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
    if backend.is_cupy_array(q.data) and fused_attention.supported(q.data, k.data, v.data, m):
        key_mask = None if m is None else fused_attention.key_mask_of(m, S)
        out, lse = fused_attention.forward(q.data, k.data, v.data, key_mask, is_causal, scale)
        return Tensor._from_op(out, (q, k, v), lambda g: fused_attention.backward(
            q.data, k.data, v.data, out, lse, g, key_mask, is_causal, scale), "fused_attention")
    G = _query_groups(q, k, v)
    d, d_v = q.shape[-1], v.shape[-1]
    # query heads as (…, H_kv, G, T, d): the G heads that read one K/V head side by side (G = 1 without GQA)
    qd = q.data * scale
    qd = qd.reshape(k.shape[:-2] + (G, T, d)) if G > 1 else qd[..., None, :, :]
    bias = _attention_mask(xp, T, S, is_causal, attn_mask, q.dtype)
    bias = None if bias is None else _transposed_bias(bias, G)  # (…, S, G, T)
    # Causal attention skips the keys a block of queries cannot see (FlashAttention's outer loop, without its
    # online softmax: each block's softmax is over all the keys it sees). Forward + backward of a (16, 4, T, 32)
    # attention, one thread, all keys at once vs blocks of 64 queries (alternating): T = 128 9.4 -> 8.5 ms,
    # T = 256 48 -> 29 ms, T = 512 188 -> 114 ms.
    step = _QUERY_BLOCK if is_causal else T
    blocks = [(a, min(a + step, T), min(S, a + step + S - T) if is_causal else S) for a in range(0, T, step)]
    blocks = [(a, b, n_keys) for a, b, n_keys in blocks if n_keys > 0]  # the last block sees all S keys
    unseeing = blocks[0][0]  # the first rows see no key (T > S) and give 0
    saved, outs = [], []
    for a, b, n_keys in blocks:
        qb = qd[..., a:b, :]
        qb = qb.reshape(qb.shape[:-3] + (G * (b - a), d))  # (…, G·n, d)
        e, l, ob = _attend(xp, qb, k.data[..., :n_keys, :], v.data[..., :n_keys, :],
                           None if bias is None else bias[..., :n_keys, :, a:b], G)
        saved.append((a, b, n_keys, qb, e, l, ob))
        outs.append(ob.reshape(ob.shape[:-2] + (G, b - a, d_v)))
    o = _along_queries(xp, outs, unseeing)

    def backward(g):
        g = g.reshape(g.shape[:-3] + (-1, G, T, d_v)) if G > 1 else g[..., None, :, :]  # as qd
        gqs, gk, gv = [], None, None
        for a, b, n_keys, qb, e, l, ob in reversed(saved):
            gb = g[..., a:b, :]
            gb = gb.reshape(gb.shape[:-3] + (G * (b - a), d_v))
            dq, dk, dv = _attend_backward(xp, gb, qb, k.data[..., :n_keys, :], v.data[..., :n_keys, :], e, l, ob)
            dq *= scale
            gqs.insert(0, dq.reshape(dq.shape[:-2] + (G, b - a, d)))
            if gk is None:
                gk, gv = dk, dv
            else:
                gk[..., :n_keys, :] += dk
                gv[..., :n_keys, :] += dv
        gq = _ungrouped(_along_queries(xp, gqs, unseeing))
        return (gq if q.requires_grad else None), (gk if k.requires_grad else None), (gv if v.requires_grad else None)
    return Tensor._from_op(_ungrouped(o), (q, k, v), backward, "scaled_dot_product_attention")


def _along_queries(xp, blocks, unseeing):
    """Blocks (…, G, n, x) of consecutive queries as one (…, G, T, x), after ``unseeing`` rows of zeros."""
    if unseeing:
        blocks = [xp.zeros(blocks[0].shape[:-2] + (unseeing,) + blocks[0].shape[-1:], dtype=blocks[0].dtype)] + blocks
    return blocks[0] if len(blocks) == 1 else xp.concatenate(blocks, axis=-2)


def _ungrouped(a):
    """(…, H_kv, G, T, x) → (…, H, T, x), query head h = h_kv · G + g; (1, T, x) → (T, x)."""
    return a.reshape(a.shape[:-4] + (-1,) + a.shape[-2:]) if a.ndim > 3 else a.reshape(a.shape[-2:])


_QUERY_BLOCK = 64  # queries per block in causal attention (of 16, 32, 64, 128: fastest at T = 256 and 512, tied at 128)


def _attend(xp, q, k, v, bias, G):
    """softmax(q kᵀ + bias) v for one block of (already scaled) queries q (…, G·n, d) over keys k (…, S, d),
    with bias (…, S, G, n) transposed like the scores; returns (E, l, O) for the backward.

    Laid out for NumPy (forward + backward of the train-step benchmark's (16, 4, 128, 32) attention went from
    10.7 to 9.4 ms, one thread, before the blocks of queries were added): the scores are kept transposed,
    keys along axis −2, so the softmax's max and sum over keys run across rows, vectorised, instead of one
    short reduction per query row; P stays unnormalised, E = exp(S − max) with row sums l, the 1/l going on
    the (n, d) output and gradients; the score chain runs in place on the buffer the product returns; the
    transposed operands of products are made contiguous (OpenBLAS's batched NT products are slower).
    """
    e = xp.matmul(k, xp.ascontiguousarray(xp.swapaxes(q, -1, -2)))  # Sᵀ: (…, S, G·n)
    if bias is not None:
        bias = xp.ascontiguousarray(bias)  # adding a strided view takes six times as long
        grouped = e.reshape(e.shape[:-1] + (G, e.shape[-1] // G))
        if np.broadcast_shapes(grouped.shape, bias.shape) == grouped.shape:
            xp.add(grouped, bias, out=grouped)
        else:
            e = (grouped + bias).reshape(np.broadcast_shapes(grouped.shape, bias.shape)[:-2] + e.shape[-1:])
    m = e.max(axis=-2, keepdims=True)
    e -= xp.where(xp.isfinite(m), m, 0)
    xp.exp(e, out=e)
    l = xp.swapaxes(e.sum(axis=-2, keepdims=True), -1, -2)  # (…, G·n, 1)
    l = xp.where(l > 0, l, 1)  # a query that may attend to nothing has E = 0: its output is 0
    o = xp.matmul(xp.swapaxes(e, -1, -2), v)
    o /= l
    return e, l, o


def _attend_backward(xp, g, q, k, v, e, l, o):
    """dQ (before the scale), dK, dV of one block of :func:`_attend`, given dO = g.

    dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D) with D = rowsum(dP ∘ P) = rowsum(dO ∘ O) (FlashAttention's D,
    from the (n, d) arrays), dQ = dS K, dK = dSᵀ q; with P = E / l the 1/l goes on dO first.
    """
    g_l = g / l
    dv = xp.matmul(e, g_l)
    d = (g_l * o).sum(axis=-1, keepdims=True)  # D / l
    ds = xp.matmul(v, xp.ascontiguousarray(xp.swapaxes(g_l, -1, -2)))  # (dP / l)ᵀ, then dSᵀ in its place
    ds -= xp.swapaxes(d, -1, -2)
    ds *= e
    return xp.matmul(xp.swapaxes(ds, -1, -2), k), xp.matmul(ds, q), dv


def _query_groups(q, k, v):
    """G = H / H_kv, the query heads per K/V head (1 unless k and v have fewer heads than q)."""
    if q.ndim < 3 or k.ndim != q.ndim or q.shape[-3] == k.shape[-3] or k.shape[-3] == 1:
        return 1
    H, H_kv = q.shape[-3], k.shape[-3]
    if H % H_kv or v.shape[-3] != H_kv or q.shape[:-3] != k.shape[:-3] or v.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"scaled_dot_product_attention: q {q.shape}, k {k.shape}, v {v.shape}: for grouped-query "
                         "attention q (..., H, T, d) needs k and v (..., H_kv, S, d) with the same leading axes "
                         "and H a multiple of H_kv")
    return H // H_kv


def _transposed_bias(bias, G):
    """A bias broadcastable to the scores (…, H, T, S) as one broadcastable to their transpose laid out by
    K/V head, (…, H_kv, S, G, T), where query head h = h_kv · G + g (G = 1 without GQA). A view."""
    bias = bias.swapaxes(-1, -2)
    if bias.ndim < 3 or bias.shape[-3] == 1:
        return bias[..., None, :]
    return bias.reshape(bias.shape[:-3] + (bias.shape[-3] // G, G) + bias.shape[-2:]).swapaxes(-3, -2)


# ------------------------------------------------------------ log-probs
def token_logprobs(logits, targets):
    """log softmax(logits)[..., targets]: log π(y_t | context) for each position.

    logits (…, V), targets (…) integer. Backward: g · (onehot(targets) − softmax(logits)).
    On CuPy (float32) this runs the fused kernels of ``minirlhf.kernels.logprobs``: one read of
    the logits forward, nothing of their size kept for backward. The range check of the targets
    runs on NumPy only (on CuPy it would wait for the GPU); there an out-of-range target gives NaN.
    """
    idx = _int_index(targets, "token_logprobs", "targets")
    if backend.device_of(idx) != logits.device:
        raise RuntimeError(f"token_logprobs: targets are on {backend.device_of(idx)}, logits on {logits.device}")
    if idx.shape != logits.shape[:-1]:
        raise ValueError(f"token_logprobs: targets shape {idx.shape} must equal logits shape without its last "
                         f"axis {logits.shape[:-1]}")
    V = logits.shape[-1]
    _check_reduced_axis(logits, -1, "token_logprobs")
    if idx.size and not backend.is_cupy_array(idx) and (idx.min() < 0 or idx.max() >= V):
        raise IndexError(f"token_logprobs: targets must lie in [0, {V}), got min {int(idx.min())} "
                         f"max {int(idx.max())}")
    x2 = logits.data.reshape(-1, V) if backend.is_cupy_array(logits.data) else None  # (a copy if strided)
    if x2 is not None and fused_logprobs.supported(x2):
        t = idx.reshape(-1)
        out, lse = fused_logprobs.forward(x2, t)
        return Tensor._from_op(out.reshape(idx.shape), (logits,), lambda g: (
            fused_logprobs.backward(x2, t, lse, g.reshape(-1)).reshape(logits.shape),), "fused_token_logprobs")
    xp = logits.xp
    x = logits.data
    m = x.max(axis=-1, keepdims=True)
    m = xp.where(m == -xp.inf, 0, m)  # a row of −inf stays −inf − (−inf) = NaN below; +inf and NaN rows give NaN
    e = x - m
    xp.exp(e, out=e)
    s = e.sum(axis=-1, keepdims=True)
    # (x_t − m) − log s, not x_t − (m + log s): at |x| ~ 1e30 the sum m + log s rounds log s away
    out = (xp.take_along_axis(x, idx[..., None], axis=-1) - m)[..., 0] - xp.log(s)[..., 0]

    def backward(g):
        grad = e / s
        grad *= -g[..., None]
        flat = grad.reshape(-1, V)
        flat[xp.arange(flat.shape[0]), idx.reshape(-1)] += g.reshape(-1)
        return (grad,)
    return Tensor._from_op(out, (logits,), backward, "token_logprobs")


def cross_entropy(logits, targets, mask=None, ignore_index=-100):
    """Mean of −log softmax(logits)[targets] over positions with mask 1 and target != ignore_index.

    An all-masked batch gives 0, not NaN.
    """
    idx = _int_index(targets, "cross_entropy", "targets")
    if backend.device_of(idx) != logits.device:
        raise RuntimeError(f"cross_entropy: targets are on {backend.device_of(idx)}, logits on {logits.device}")
    xp = logits.xp
    keep = idx != ignore_index
    if mask is not None:
        keep = keep & _mask_array(mask, Tensor(idx), "cross_entropy")
    w = keep.astype(logits.dtype)
    logp = token_logprobs(logits, xp.where(keep, idx, 0))
    return -(logp * w).sum() / xp.maximum(w.sum(), 1.0)


def linear_token_logprobs(hidden, weight, targets, chunk_size=1024):
    """token_logprobs(hidden @ weightᵀ, targets) without ever holding all the logits.

    hidden (N, C) or (B, T, C), weight (V, C) (the LM head), integer targets (N,) or (B, T).
    The rows are processed ``chunk_size`` at a time: only a (chunk_size, V) block of logits
    exists at once, and only lse (one number per row) is kept for the backward, which
    recomputes each chunk's logits and forms d logits = g · (onehot(targets) − softmax),
    d hidden = d logits · weight and d weight = Σ_chunks d logitsᵀ · hidden. Peak memory is
    O(chunk_size · V) instead of O(N · V), for one extra matrix product in the backward.
    On CuPy (float32) each chunk goes through the fused log-prob kernels.
    """
    weight = _tensor(weight, hidden, "linear_token_logprobs")
    idx = _int_index(targets, "linear_token_logprobs", "targets")
    if backend.device_of(idx) != hidden.device:
        raise RuntimeError(f"linear_token_logprobs: targets are on {backend.device_of(idx)}, hidden on "
                           f"{hidden.device}")
    if hidden.ndim not in (2, 3) or weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_token_logprobs: hidden of shape {hidden.shape} and weight of shape {weight.shape} "
                         "do not fit; expected hidden (N, C) or (B, T, C) and weight (V, C)")
    if idx.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_token_logprobs: targets shape {idx.shape} must equal hidden shape without its "
                         f"last axis {hidden.shape[:-1]}")
    if not (isinstance(chunk_size, numbers.Integral) and chunk_size > 0):
        raise ValueError(f"linear_token_logprobs: chunk_size must be a positive integer, got {chunk_size!r}")
    V = weight.shape[0]
    if idx.size and not backend.is_cupy_array(idx) and (idx.min() < 0 or idx.max() >= V):
        raise IndexError(f"linear_token_logprobs: targets must lie in [0, {V}), got min {int(idx.min())} "
                         f"max {int(idx.max())}")
    h2 = hidden.data.reshape(-1, hidden.shape[-1])
    t = idx.reshape(-1)
    impl = kernel_reference  # the same chunked algorithm in array ops: NumPy, or CuPy where no kernel fits
    if backend.is_cupy_array(h2) and fused_logprobs.linear_supported(h2, weight.data):
        impl = fused_logprobs
    out, lse = impl.linear_logprobs_forward(h2, weight.data, t, chunk_size)

    def backward(g):
        dh, dw = impl.linear_logprobs_backward(h2, weight.data, t, lse, g.reshape(-1), chunk_size,
                                               hidden.requires_grad, weight.requires_grad)
        return (None if dh is None else dh.reshape(hidden.shape)), dw
    return Tensor._from_op(out.reshape(idx.shape), (hidden, weight), backward, "linear_token_logprobs")


# ---------------------------------------------- the Llama family's layers
def rms_norm(x, weight=None, eps=1e-6):
    """x / √(mean(x²) + eps) · weight over the last axis (Zhang & Sennrich 2019, eq. 4).

    LayerNorm without the mean: no centring and no bias. With r = 1/√(mean(x²) + eps),
    x̂ = x · r and ĝ = g · weight, the backward is dx = r · (ĝ − x̂ · mean(ĝ x̂)) and dweight = Σ g x̂.
    """
    if weight is not None:
        weight = _tensor(weight, x, "rms_norm")
        if weight.shape != x.shape[-1:]:
            raise ValueError(f"rms_norm: weight has shape {weight.shape}, expected ({x.shape[-1]},), the last "
                             f"axis of the input {x.shape}")
    xp = x.xp
    r = 1.0 / xp.sqrt((x.data * x.data).mean(axis=-1, keepdims=True) + eps)
    xhat = x.data * r
    out = xhat * weight.data if weight is not None else xhat
    batch_axes = tuple(range(x.ndim - 1))

    def backward(g):
        gx = gw = None
        if x.requires_grad:
            gh = g * weight.data if weight is not None else g
            gx = r * (gh - xhat * (gh * xhat).mean(axis=-1, keepdims=True))
        if weight is not None and weight.requires_grad:
            gw = (g * xhat).sum(axis=batch_axes)
        return (gx,) if weight is None else (gx, gw)
    parents = (x,) if weight is None else (x, weight)
    return Tensor._from_op(out, parents, backward, "rms_norm")


def silu(x):
    """x · σ(x) (Elfwing et al. 2018; "swish"), the gate of SwiGLU. d/dx = σ(x) (1 + x (1 − σ(x)))."""
    s = _sigmoid(x.xp, x.data)
    return Tensor._from_op(x.data * s, (x,), lambda g: (g * (s * (1 + x.data * (1 - s))),), "silu")


def _rotate_half(xp, x):
    """(x₁, x₂) → (−x₂, x₁) on the two halves of the last axis."""
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotary_embedding(x, cos, sin):
    """x · cos + rotate_half(x) · sin: rotary position embedding (Su et al. 2021, eq. 34), in the
    rotate-half layout of Hugging Face's Llama: dimension i is paired with i + d/2, not with i + 1.

    x (…, T, d) with d even; cos and sin (constants) broadcastable to x, each the angles
    θ_i · position repeated over both halves. The rotation is orthogonal, so the backward rotates
    back: dx = g · cos − rotate_half(g · sin).
    """
    if x.shape[-1] % 2:
        raise ValueError(f"rotary_embedding: the last axis of x {x.shape} must be even (pairs of dimensions)")
    xp = x.xp
    cos, sin = (_tensor(c, x, "rotary_embedding").data for c in (cos, sin))
    try:
        np.broadcast_shapes(cos.shape, sin.shape, x.shape)
    except ValueError:
        raise ValueError(f"rotary_embedding: cos {cos.shape} and sin {sin.shape} must broadcast to x "
                         f"{x.shape}") from None
    out = x.data * cos + _rotate_half(xp, x.data) * sin
    return Tensor._from_op(out, (x,), lambda g: (g * cos - _rotate_half(xp, g * sin),), "rotary_embedding")
