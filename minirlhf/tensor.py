"""Tensor: an array with a gradient, and the graph that reverse-mode autodiff walks.

Every differentiable op (in ``functional.py``) computes its output array and
hands :func:`Tensor._from_op` a closure ``backward(g)`` that maps the output's
gradient ``g`` to one gradient per input. ``Tensor.backward`` sorts the graph
topologically (iteratively: a 20,000-op chain is fine), runs the closures from
the output back to the leaves, sums each gradient back to its input's shape
(broadcasting), and accumulates gradients of tensors used more than once.

Each tensor counts its in-place updates (``_version``; assigning ``t.data``, which
``p.data -= lr * g`` does, is one). An op records its inputs' versions, and
backward refuses an input that changed since, as PyTorch does: an optimizer step
between a forward and its backward would otherwise give gradients at the new weights.

This module and ``functional.py`` import each other, the one circle in the package:
the Tensor's operators (``a + b``, ``x.sum()``) are the ops of ``functional``, and
those ops build Tensors.
"""
import contextlib
import threading

import numpy as np

from . import backend

DEFAULT_DTYPE = np.float32
_mode = threading.local()  # per thread, as in PyTorch: another thread's no_grad() leaves this one alone


@contextlib.contextmanager
def no_grad():
    """Ops inside this block build no graph (inference, rollouts, reference models); in this thread only."""
    previous, _mode.grad_enabled = is_grad_enabled(), False
    try:
        yield
    finally:
        _mode.grad_enabled = previous


def is_grad_enabled():
    return getattr(_mode, "grad_enabled", True)


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes along which an input of ``shape`` was broadcast."""
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


class Scattered:
    """The gradient of x[key], for a key that selects each element at most once: ``values`` at ``key``,
    zero elsewhere. The engine adds it into one buffer per input, so the slices of one tensor (the q, k
    and v of a fused projection) cost one zero-filled gradient, not one each plus their sums."""

    def __init__(self, key, values):
        self.key, self.values = key, values


class Tensor:
    """An n-d array (NumPy or CuPy) that can record the ops applied to it.

    ``Tensor(data, requires_grad=False, dtype=None, device=None)``: floating
    data becomes float32 unless ``dtype`` says otherwise (float64 for gradient
    checks); integer and boolean arrays (token ids, masks) keep their dtype.
    ``.grad`` is an array of the same backend as ``data``.
    """

    __array_priority__ = 100  # make ndarray + Tensor call Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None, device=None):
        if isinstance(data, Tensor):
            data = data.data
        if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
            data = np.asarray(data)
        if device is not None:
            data = backend.to_device(data, device)
        if dtype is None and data.dtype.kind == "f":
            dtype = DEFAULT_DTYPE
        if dtype is not None:
            data = data.astype(dtype, copy=False)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"Tensor: requires_grad needs a floating dtype, got {data.dtype}")
        self._data = data
        self._versions = [0]
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._prev = ()
        self._saved_versions = ()
        self._backward = None
        self._op = None
        self._freed = False

    @classmethod
    def _from_op(cls, data, parents, backward, op):
        """The output of ``op``; it joins the graph if grad is on and any parent needs grad."""
        out = cls.__new__(cls)
        # NumPy reductions to one element return scalars (np.float32), not 0-d arrays
        out._data = data if isinstance(data, np.ndarray) or backend.is_cupy_array(data) else np.asarray(data)
        out._versions = [0]
        out.grad = None
        out._freed = False
        out._op = op
        if is_grad_enabled() and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._prev = parents
            out._saved_versions = tuple(p._versions[0] for p in parents)
            out._backward = backward
        else:
            out.requires_grad = False
            out._prev = ()
            out._saved_versions = ()
            out._backward = None
        return out

    # ------------------------------------------------------------------ data
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        """Replacing or updating the array in place (``p.data -= lr * g``) makes a new version."""
        self._data = value
        self._versions[0] += 1

    @property
    def _version(self):
        return self._versions[0]

    # ------------------------------------------------------------------ info
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def xp(self):
        return backend.get_array_module(self.data)

    @property
    def is_leaf(self):
        return self._op is None

    def __len__(self):
        return len(self.data)

    def __bool__(self):
        if self.data.size != 1:
            raise RuntimeError(f"bool: the truth value of a Tensor with {self.data.size} elements (shape "
                               f"{self.shape}) is ambiguous; use .any() or .all() of its data")
        return bool(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        op = f", op={self._op}" if self._op else ""
        return f"Tensor({backend.to_numpy(self.data)!r}, device={self.device}{grad}{op})"

    def item(self):
        return self.data.item()

    def numpy(self):
        """A NumPy copy of the data (copies from the GPU)."""
        return backend.to_numpy(self.data).copy()

    def tolist(self):
        return backend.to_numpy(self.data).tolist()

    def detach(self):
        """The same data, cut from the graph (it shares the version count: an in-place update of either is seen)."""
        out = Tensor(self.data, dtype=self.dtype)
        out._versions = self._versions
        return out

    def requires_grad_(self, flag=True):
        if flag and self.dtype.kind != "f":
            raise TypeError(f"requires_grad_: needs a floating dtype, got {self.dtype}")
        self.requires_grad = flag
        return self

    def to(self, device):
        """A copy on ``device`` ("cpu" or "cuda"); itself if already there. Differentiable."""
        if device == self.device:
            return self
        return F.to_device(self, device)

    # -------------------------------------------------------------- autograd
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` is the cotangent; it may be omitted only for a one-element
        tensor. The graph is freed afterwards unless ``retain_graph=True``.
        """
        if self._freed:
            raise RuntimeError(f"backward: the graph behind this tensor (op {self._op}) was already freed "
                               "by an earlier backward(); pass retain_graph=True to the first call to "
                               "go through it twice")
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require grad (no input had requires_grad=True, "
                               "or it was computed under no_grad())")
        xp = self.xp
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward: grad can be implicit only for a one-element output; got shape "
                                   f"{self.shape}. Reduce it (e.g. .sum()) or pass grad= of that shape")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            if backend.device_of(grad) != self.device:
                raise RuntimeError(f"backward: grad is on {backend.device_of(grad)}, tensor on {self.device}")
            grad = xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward: grad has shape {grad.shape}, expected the tensor's shape {self.shape}")

        grads = {id(self): grad}
        owned = set()  # ids of the inputs whose gradient is a buffer of the engine's own: later parts add in place
        for node in reversed(self._topological_order()):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._op is None:
                if node.grad is not None:
                    node.grad = node.xp.asarray(node.grad + g)
                else:
                    node.grad = g if id(node) in owned else node.xp.array(g)
                continue
            if node._freed:
                raise RuntimeError(f"backward: reached a freed part of the graph (op {node._op}); it was used by "
                                   "an earlier backward() without retain_graph=True")
            for parent, saved in zip(node._prev, node._saved_versions):
                if parent._versions[0] != saved:
                    raise RuntimeError(
                        f"backward: an input of op {node._op} (shape {parent.shape}) has been modified by an "
                        f"inplace operation (e.g. an optimizer step) since the forward: it is at version "
                        f"{parent._versions[0]}, the graph needs version {saved}. Run the forward again")
            for parent, pg in zip(node._prev, node._backward(g)):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                if isinstance(pg, Scattered):
                    if key not in owned:
                        buffer = parent.xp.zeros(parent.shape, dtype=parent.dtype)
                        if key in grads:
                            buffer += grads[key]
                        grads[key] = buffer
                        owned.add(key)
                    grads[key][pg.key] += pg.values
                    continue
                if pg.shape != parent.shape:
                    pg = unbroadcast(pg, parent.shape)
                if pg.dtype != parent.dtype:  # a float32 input of a float64 op gets a float32 gradient
                    pg = pg.astype(parent.dtype)
                if key not in grads:
                    grads[key] = pg
                elif key in owned:
                    grads[key] += pg
                else:
                    grads[key] = parent.xp.asarray(grads[key] + pg)  # asarray: NumPy makes a 0-d sum a scalar
                    owned.add(key)
            if not retain_graph:
                node._prev, node._saved_versions, node._backward, node._freed = (), (), None, True

    def _topological_order(self):
        """Nodes that need grad, each after all of its inputs (iterative DFS)."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for parent in node._prev:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
        return order

    # ------------------------------------------------------------- operators
    def __add__(self, other):
        return F.add(self, other)

    def __radd__(self, other):
        return F.add(other, self)

    def __sub__(self, other):
        return F.sub(self, other)

    def __rsub__(self, other):
        return F.sub(other, self)

    def __mul__(self, other):
        return F.mul(self, other)

    def __rmul__(self, other):
        return F.mul(other, self)

    def __truediv__(self, other):
        return F.div(self, other)

    def __rtruediv__(self, other):
        return F.div(other, self)

    def __neg__(self):
        return F.neg(self)

    def __pow__(self, exponent):
        return F.pow(self, exponent)

    def __rpow__(self, base):
        return F.pow(base, self)

    def __matmul__(self, other):
        return F.matmul(self, other)

    def __rmatmul__(self, other):
        return F.matmul(other, self)

    def __getitem__(self, key):
        return F.index(self, key)

    # comparisons give constant boolean tensors (no graph); == stays identity
    def __lt__(self, other):
        return Tensor(self.data < _data(other))

    def __le__(self, other):
        return Tensor(self.data <= _data(other))

    def __gt__(self, other):
        return Tensor(self.data > _data(other))

    def __ge__(self, other):
        return Tensor(self.data >= _data(other))

    # ---------------------------------------------------------- method forms
    def sum(self, axis=None, keepdims=False):
        return F.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return F.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return F.max(self, axis, keepdims)

    def exp(self):
        return F.exp(self)

    def log(self):
        return F.log(self)

    def tanh(self):
        return F.tanh(self)

    def sigmoid(self):
        return F.sigmoid(self)

    def relu(self):
        return F.relu(self)

    def sqrt(self):
        return F.sqrt(self)

    def abs(self):
        return F.abs(self)

    def softmax(self, axis=-1):
        return F.softmax(self, axis)

    def log_softmax(self, axis=-1):
        return F.log_softmax(self, axis)

    def reshape(self, *shape):
        return F.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    view = reshape

    def transpose(self, axis0=-2, axis1=-1):
        return F.transpose(self, axis0, axis1)

    def permute(self, *axes):
        return F.permute(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes)

    @property
    def T(self):
        return F.permute(self, tuple(reversed(range(self.ndim))))

    def unsqueeze(self, axis):
        return F.unsqueeze(self, axis)

    def squeeze(self, axis):
        return F.squeeze(self, axis)

    def expand(self, *shape):
        return F.expand(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def masked_fill(self, mask, value):
        return F.masked_fill(self, mask, value)

    def clip(self, min=None, max=None):
        return F.clip(self, min, max)

    clamp = clip

    def astype(self, dtype):
        return F.astype(self, dtype)

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)


Tensor.__hash__ = object.__hash__


def _data(x):
    return x.data if isinstance(x, Tensor) else x


from . import functional as F  # noqa: E402  (functional builds on Tensor)
