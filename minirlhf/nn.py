"""Modules: containers of parameters with a forward, as in torch.nn."""
import math
from collections import OrderedDict

import numpy as np

from . import backend
from . import functional as F
from .tensor import Tensor, DEFAULT_DTYPE


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (requires_grad by default)."""

    def __init__(self, data, requires_grad=True, dtype=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)


class Module:
    """Base class: parameters are found by walking attributes (Parameters, Modules, ModuleLists)."""

    training = True

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}{name}.")

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) pairs; a parameter shared by two modules is listed once."""
        seen = set()
        for mod_prefix, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield mod_prefix + name, value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    def state_dict(self):
        """Name → array (a copy), in a stable order."""
        return OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters; shapes must match, and with ``strict`` the names too."""
        own = dict(self.named_parameters())
        missing = [n for n in own if n not in state]
        unexpected = [n for n in state if n not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, value in state.items():
            if name not in own:
                continue
            p = own[name]
            if tuple(value.shape) != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)} in the state, "
                                 f"{p.shape} in the model")
            p.data = backend.to_device(p.xp.asarray(backend.to_numpy(value) if p.device == "cpu" else value,
                                                    dtype=p.dtype), p.device).copy()
        return self

    def train(self, mode=True):
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device_or_dtype):
        """Move every parameter to a device ("cpu"/"cuda") or cast it to a float dtype, in place."""
        for p in self.parameters():
            if isinstance(device_or_dtype, str):
                p.data = backend.to_device(p.data, device_or_dtype)
            else:
                p.data = p.data.astype(device_or_dtype)
            p.grad = None
        return self


class ModuleList(Module):
    def __init__(self, modules=()):
        self._modules = list(modules)

    def named_modules(self, prefix=""):
        yield prefix, self
        for i, m in enumerate(self._modules):
            yield from m.named_modules(f"{prefix}{i}.")

    def __getitem__(self, i):
        return self._modules[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def append(self, module):
        self._modules.append(module)


def _uniform(shape, bound):
    return backend.generator("cpu").uniform(-bound, bound, size=shape).astype(DEFAULT_DTYPE)


class Linear(Module):
    """y = x Wᵀ + b, W of shape (out_features, in_features); init U(−1/√in, 1/√in) as torch."""

    def __init__(self, in_features, out_features, bias=True):
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(_uniform((out_features, in_features), bound))
        self.bias = Parameter(_uniform((out_features,), bound)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    """Rows of a (num_embeddings, embedding_dim) table, init N(0, 1) as torch."""

    def __init__(self, num_embeddings, embedding_dim):
        self.weight = Parameter(backend.generator("cpu").standard_normal((num_embeddings, embedding_dim))
                                .astype(DEFAULT_DTYPE))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps=1e-5, bias=True):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape = shape
        self.eps = eps
        self.weight = Parameter(np.ones(shape, dtype=DEFAULT_DTYPE))
        self.bias = Parameter(np.zeros(shape, dtype=DEFAULT_DTYPE)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Dropout(Module):
    def __init__(self, p=0.1):
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)
