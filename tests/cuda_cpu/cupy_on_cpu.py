"""A NumPy-backed stand-in of the ``cupy`` module whose ``RawModule`` runs the .cu kernels on the CPU.

``install(monkeypatch)`` puts it in ``sys.modules["cupy"]``, so the real launchers of
``minirlhf.kernels`` (and ``minirlhf.functional``'s dispatch to them) run unchanged: arrays are
NumPy arrays of a type that says it is CuPy's, kernels are compiled by ``build.py`` and executed
block by block by ``cuda_cpu.h``, with their arguments passed as ``cuLaunchKernel`` takes them.

Every launch runs twice, under the harness's two schedules, from the same inputs; the memory
behind every array argument must come out bit for bit the same, else the launch raises. (Under
the sanitizers, whose run looks for memory errors, once: schedule 0.)

It stands in for CuPy as far as the kernels' launchers need, no further: arrays convert to NumPy
silently here, where real CuPy refuses.
"""
import ctypes
import sys
import types

import numpy as np

from . import build

OPT_IN_SHARED_BYTES = 227 * 1024  # an H100/H200's opt-in shared memory per block
DEFAULT_SHARED_BYTES = 48 * 1024


class MemoryPointer:
    """What ``cupy.ndarray.data`` is: the address of the first element, as ``ptr``."""
    __module__ = "cupy.cuda.memory"

    def __init__(self, ptr):
        self.ptr = ptr


class ndarray(np.ndarray):
    """A host array that passes for a CuPy one (``minirlhf.backend.is_cupy_array`` reads the module)."""
    __module__ = "cupy"

    @property
    def data(self):
        return MemoryPointer(self.ctypes.data)

    def get(self):
        return np.array(self, copy=True).view(np.ndarray)


def _device(x):
    if isinstance(x, np.ndarray) and not isinstance(x, ndarray):
        return x.view(ndarray)
    if isinstance(x, (tuple, list)):
        return type(x)(_device(e) for e in x)
    return x


def _wrap(fn):
    def on_device(*args, **kwargs):
        return _device(fn(*args, **kwargs))
    return on_device


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_ulonglong),
                ("max_dynamic_shared_bytes", ctypes.c_ulonglong), ("schedule", ctypes.c_int)]


_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
            np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
            np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


class RawKernel:
    """One ``__global__`` function: ``kernel(grid, block, args, shared_mem=0)`` as CuPy's."""

    def __init__(self, library, name):
        self.name = name
        self._launch = getattr(library, f"launch_{name}")
        self._launch.restype = ctypes.c_int
        self.max_dynamic_shared_size_bytes = DEFAULT_SHARED_BYTES

    @staticmethod
    def memory(a):
        """The host array behind a device array argument, or None for any other argument."""
        return a if isinstance(a, ndarray) else None

    def __call__(self, grid, block, args, shared_mem=0):
        values, arrays = [], []
        for i, a in enumerate(args):
            memory = self.memory(a)
            if memory is not None:
                values.append(ctypes.c_void_p(memory.ctypes.data))
                arrays.append(memory)
            elif isinstance(a, np.generic) and a.dtype in _SCALARS:
                values.append(_SCALARS[a.dtype](a.item()))
            else:
                raise TypeError(f"{self.name}: argument {i} is {type(a).__name__}; pass a device array or a NumPy "
                                "scalar of the kernel's type (CuPy would pass a Python int as 64 bits)")
        pointers = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                              for v in values])
        sizes = (ctypes.c_ulonglong * max(1, len(values)))(*[ctypes.sizeof(v) for v in values])
        before = [a.copy() for a in arrays]
        results = []
        for schedule in (0,) if build.sanitizing() else (0, 1):
            for a, b in zip(arrays, before):
                np.copyto(a, b)
            config = _LaunchConfig((ctypes.c_uint * 3)(*_dims(grid)), (ctypes.c_uint * 3)(*_dims(block)),
                                   int(shared_mem), int(self.max_dynamic_shared_size_bytes), schedule)
            error = ctypes.create_string_buffer(512)
            if self._launch(ctypes.byref(config), pointers, sizes, len(values), error, len(error)):
                raise RuntimeError(f"{self.name}: {error.value.decode()} (schedule {schedule})")
            results.append([a.copy() for a in arrays])
        for i, (first, second) in enumerate(zip(results[0], results[-1])):
            if first.tobytes() != second.tobytes():
                raise AssertionError(f"{self.name}: array argument {i} differs between the two schedules: "
                                     "a missing barrier or cp.async wait")


def _dims(d):
    d = tuple(d) if isinstance(d, (tuple, list)) else (d,)
    return tuple(int(x) for x in d) + (1,) * (3 - len(d))


class RawModule:
    """``cupy.RawModule(code=...)``: the source compiled for the CPU harness."""

    kernel_type = RawKernel

    def __init__(self, code, options=()):
        path, self._names = build.build(code)
        self._library = ctypes.CDLL(str(path))

    def get_function(self, name):
        if name not in self._names:
            raise AttributeError(f"no __global__ function {name!r} in the module")
        return self.kernel_type(self._library, name)


def _runtime():
    return types.SimpleNamespace(
        getDevice=lambda: 0, getDeviceCount=lambda: 1,
        getDeviceProperties=lambda device: {"name": b"cuda_cpu", "sharedMemPerBlock": DEFAULT_SHARED_BYTES,
                                            "sharedMemPerBlockOptin": OPT_IN_SHARED_BYTES})


def module():
    """A fresh ``cupy`` stand-in module."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = ndarray
    cupy.RawModule = RawModule
    cupy.cuda = types.SimpleNamespace(runtime=_runtime())
    cupy.asnumpy = lambda a: np.array(a, copy=True).view(np.ndarray)

    def __getattr__(name):
        value = getattr(np, name)
        return _wrap(value) if callable(value) and not isinstance(value, type) else value
    cupy.__getattr__ = __getattr__
    return cupy


def install(monkeypatch):
    """Make ``import cupy`` give the stand-in for one test, with the kernel caches emptied around it."""
    from minirlhf import backend, kernels
    from minirlhf.kernels import attention
    cupy = module()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(backend, "_cupy", cupy)
    monkeypatch.setattr(backend, "_cupy_checked", True)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "_kernels", {})
    attention._shared_memory_limit.cache_clear()
    return cupy
