"""minirlhf: a from-scratch, readable RLHF stack on NumPy (CPU) and CuPy (GPU)."""
from . import backend
from .backend import get_array_module, manual_seed
from .tensor import DEFAULT_DTYPE, Tensor, is_grad_enabled, no_grad
from . import functional
from . import nn
from . import optim

__version__ = "0.1.0"


def zeros(shape, dtype=DEFAULT_DTYPE, device="cpu"):
    return Tensor(backend.xp_for(device).zeros(shape, dtype=dtype))


def ones(shape, dtype=DEFAULT_DTYPE, device="cpu"):
    return Tensor(backend.xp_for(device).ones(shape, dtype=dtype))
