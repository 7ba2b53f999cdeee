"""A strict stand-in of ``cupy`` backed by NumPy: the GPU path of minirlhf, run end to end without a GPU.

Where ``cupy_on_cpu`` lends the kernels' launchers a lenient CuPy (NumPy arrays that say they are
CuPy's), this one holds the rest of the GPU path to CuPy's rules:

* A device array is a ``strict_cupy.ndarray``, a type of its own (not an ndarray subclass) that
  holds its NumPy array out of reach. It refuses implicit conversion as CuPy does:
  ``np.asarray(x)`` raises CuPy's TypeError, and a NumPy array as an operand of a device op
  raises CuPy's "Unsupported type" (CuPy never copies host data to the device behind your back).
  NumPy functions of device arrays dispatch to this module, as CuPy's ``__array_function__`` and
  ``__array_ufunc__`` make them; functions CuPy has but minirlhf does not use are missing.
* Every copy from the device to the host is counted, with the minirlhf function that made it:
  ``.get()``, ``cupy.asnumpy``, ``.item()``, ``.tolist()``, ``float()``/``int()``/``bool()`` of an
  array, printing one, and the ops whose result size is read back from the device before the
  result exists (boolean-mask indexing, ``flatnonzero``, ``unique``, ``bincount``).
* Every allocation of device memory is counted (an op whose result shares no memory with its
  inputs), with its size and the function that asked for it.
* ``RawModule`` compiles the .cu sources for the CPU execution harness (``cuda_cpu.h``), so the
  real launchers run the kernels thread by thread, as in ``cupy_on_cpu``.

The math underneath is NumPy's, so a "cuda" run gives the NumPy path's numbers (the random
generators are NumPy's too: real CuPy draws other numbers from the same seed).

``install(monkeypatch)`` makes ``import cupy`` and ``import cupyx`` give this module for one test;
as a pytest plugin it plays the GPU for a whole session, so every "cuda" case of the suite runs on it:

    PYTHONPATH=.:tests pytest -p cuda_cpu.strict_cupy --device cuda
"""
import functools
import os
import sys
import types

import numpy as np

from . import cupy_on_cpu

_HERE = os.path.dirname(os.path.abspath(__file__))
_MINIRLHF = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "minirlhf")
# frames that only pass a copy on: the site of a copy is the first frame outside these
_PASSING_ON = (_HERE, os.path.dirname(np.__file__), os.path.join(_MINIRLHF, "backend.py"),
               os.path.join(_MINIRLHF, "tensor.py"))
_NOT_ALLOWED = ("Implicit conversion to a NumPy array is not allowed. "
                "Please use `.get()` to construct a NumPy array explicitly.")


class Counts:
    """What crossed between host and device, and what was allocated on the device, by whom.

    ``device_to_host``, ``host_to_device``: one site per copy; ``allocations``: (bytes, site) per
    allocation. A site is "module.function" of the first caller outside this module, NumPy, and
    ``minirlhf.backend`` and ``minirlhf.tensor`` (which only pass a copy on: ``to_numpy``, ``Tensor.item``),
    and outside comprehensions and lambdas.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.device_to_host, self.host_to_device, self.allocations = [], [], []

    def by_site(self, events):
        """{site: number of events} of a list above."""
        out = {}
        for site in events:
            site = site[1] if isinstance(site, tuple) else site
            out[site] = out.get(site, 0) + 1
        return out


COUNTS = Counts()

_ANONYMOUS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>")


def _site():
    frame = sys._getframe(1)
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(_PASSING_ON)
                                        or frame.f_code.co_name in _ANONYMOUS):
        frame = frame.f_back
    module = frame.f_globals.get("__name__", "?")
    return f"{module}.{frame.f_code.co_name}"


def _read_back(what):
    COUNTS.device_to_host.append(_site())
    return what


# ---------------------------------------------------------------- the array
class ndarray:
    """An array on the "device": its NumPy array (``_host``) is reachable only through ``.get()``."""

    __module__ = "cupy"  # minirlhf.backend.is_cupy_array reads the module
    __array_priority__ = 100
    __slots__ = ("_host",)
    __hash__ = None

    @classmethod
    def _of(cls, host):
        out = cls.__new__(cls)
        out._host = host
        return out

    # layout
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    ndim = property(lambda self: self._host.ndim)
    size = property(lambda self: self._host.size)
    strides = property(lambda self: self._host.strides)
    itemsize = property(lambda self: self._host.itemsize)
    nbytes = property(lambda self: self._host.nbytes)
    flags = property(lambda self: types.SimpleNamespace(c_contiguous=self._host.flags.c_contiguous,
                                                        f_contiguous=self._host.flags.f_contiguous))
    data = property(lambda self: cupy_on_cpu.MemoryPointer(self._host.ctypes.data))
    T = property(lambda self: self.transpose())

    # the only ways back to the host: each one a counted copy
    def get(self):
        return _read_back(self._host.copy())

    def item(self):
        return _read_back(self._host.item())

    def tolist(self):
        return _read_back(self._host.tolist())

    def __float__(self):
        return float(self.get())

    def __int__(self):
        return int(self.get())

    def __bool__(self):
        if self.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous. "
                             "Use a.any() or a.all()")
        return bool(self.get())

    def __repr__(self):
        return repr(self.get())

    __str__ = __repr__

    def __format__(self, spec):
        return format(self.get(), spec)

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_NOT_ALLOWED)

    # containers
    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __getitem__(self, key):
        key = _index(key)
        if any(getattr(k, "dtype", None) == bool for k in (key if isinstance(key, tuple) else (key,))):
            _read_back(None)  # the result's size is the mask's count, read back before the result exists
        return _result(self._host[key], (self._host,))

    def __setitem__(self, key, value):
        self._host[_index(key)] = _operand(value)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # NumPy's functions of device arrays come here (NEP 13 and 18), as they go to CuPy
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or ufunc.__name__ not in _UFUNCS:
            return NotImplemented
        if not all(isinstance(x, (ndarray, np.ndarray) + _SCALAR_TYPES) for x in inputs):
            return NotImplemented
        if "out" in kwargs:  # NumPy hands ``out`` over as a tuple; a ufunc of one output takes the array
            (kwargs["out"],) = kwargs["out"]
        return FUNCTIONS[ufunc.__name__](*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in _FUNCTIONS or not all(issubclass(t, (ndarray, np.ndarray)) for t in types):
            return NotImplemented
        return FUNCTIONS[func.__name__](*args, **kwargs)


_SCALAR_TYPES = (bool, int, float, complex, np.generic)


def _should_use_rop(x, y):
    """CuPy's rule: defer to ``y``'s reflected operator if it opts out of ufuncs or outranks x."""
    try:
        return y.__array_ufunc__ is None
    except AttributeError:
        return getattr(x, "__array_priority__", 0) < getattr(y, "__array_priority__", 0)


def _binary(name, reflected=False):
    def op(self, other):
        if not isinstance(other, ndarray) and _should_use_rop(self, other):
            return NotImplemented
        return FUNCTIONS[name](other, self) if reflected else FUNCTIONS[name](self, other)
    return op


def _inplace(name):
    def op(self, other):
        FUNCTIONS[name](self, other, out=self)
        return self
    return op


for _name, _ufunc in [("add", "add"), ("sub", "subtract"), ("mul", "multiply"), ("truediv", "true_divide"),
                      ("pow", "power"), ("matmul", "matmul"), ("and", "bitwise_and"), ("or", "bitwise_or"),
                      ("floordiv", "floor_divide")]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    if _name != "matmul":
        setattr(ndarray, f"__i{_name}__", _inplace(_ufunc))
for _name, _ufunc in [("lt", "less"), ("le", "less_equal"), ("gt", "greater"), ("ge", "greater_equal"),
                      ("eq", "equal"), ("ne", "not_equal")]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in [("neg", "negative"), ("abs", "absolute"), ("invert", "invert")]:
    setattr(ndarray, f"__{_name}__", lambda self, _u=_ufunc: FUNCTIONS[_u](self))
ndarray.__pos__ = lambda self: self


# ------------------------------------------------ crossing the boundary
def _operand(x):
    """The NumPy array behind an operand of a device op; a host array is refused as CuPy refuses it."""
    if isinstance(x, ndarray):
        return x._host
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    if isinstance(x, (list, tuple)):
        return type(x)(_operand(e) for e in x)
    return x


def _index(key):
    """An index: device arrays unwrapped; host index arrays and lists are copied to the device, as CuPy does."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._host
    if isinstance(key, (np.ndarray, list)):
        COUNTS.host_to_device.append(_site())
        return np.asarray(key)
    return key


def _host_arrays(args):
    for a in args:
        if isinstance(a, np.ndarray):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _host_arrays(a)


def _result(value, inputs):
    """NumPy's result as device arrays; one that shares no memory with an input is an allocation."""
    if isinstance(value, (tuple, list)):
        return type(value)(_result(v, inputs) for v in value)
    if isinstance(value, np.generic):  # CuPy's reductions give 0-d arrays, never host scalars
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        return value
    if not any(np.may_share_memory(value, a) for a in inputs):
        COUNTS.allocations.append((value.nbytes, _site()))
    return ndarray._of(value)


def _function(name, host_args=()):
    """``cupy.<name>``: NumPy's, on the NumPy arrays behind device arrays; positions in ``host_args``
    may hold host data (index lists)."""
    numpy_function = getattr(np, name)

    @functools.wraps(numpy_function)
    def on_device(*args, **kwargs):
        out = kwargs.get("out")
        args = [a if i in host_args else _operand(a) for i, a in enumerate(args)]
        kwargs = {k: _operand(v) for k, v in kwargs.items()}
        if out is not None:
            numpy_function(*args, **kwargs)
            return out
        inputs = list(_host_arrays(args)) + list(_host_arrays(kwargs.values()))
        return _result(numpy_function(*args, **kwargs), inputs)
    return on_device


# what minirlhf calls on device arrays: xp.<name> in its source, the operators' ufuncs, and
# np.concatenate (of device arrays, through NumPy's dispatch)
_UFUNCS = ("add", "subtract", "multiply", "true_divide", "divide", "power", "matmul", "negative", "absolute", "abs",
           "invert", "bitwise_and", "bitwise_or", "floor_divide", "less", "less_equal", "greater", "greater_equal",
           "equal", "not_equal", "maximum", "minimum", "exp", "expm1", "log", "log1p", "sqrt", "tanh", "sin", "cos",
           "sign", "isfinite")
_FUNCTIONS = ("arange", "argmax", "ascontiguousarray", "broadcast_to", "clip", "concatenate", "cumsum", "empty",
              "empty_like", "expand_dims", "full", "ix_", "moveaxis", "ones", "ones_like", "repeat", "sort", "split",
              "squeeze", "stack", "swapaxes", "take_along_axis", "where", "zeros", "zeros_like")
# the result's size is read back from the device before the result exists (a synchronising copy)
_SIZE_FROM_DEVICE = ("flatnonzero", "unique", "bincount")

FUNCTIONS = {name: _function(name, host_args=(1,) if name == "split" else ())
             for name in _UFUNCS + _FUNCTIONS}
for _name in _SIZE_FROM_DEVICE:
    FUNCTIONS[_name] = (lambda f: functools.wraps(f)(lambda *a, **k: _read_back(f(*a, **k))))(_function(_name))


def asarray(a, dtype=None, order=None):
    """A device array of ``a``; host data is copied to the device (counted)."""
    if isinstance(a, ndarray):
        out = a._host.astype(dtype, copy=False) if dtype is not None else a._host
        return _result(out, (a._host,))
    COUNTS.host_to_device.append(_site())
    host = np.array(_operand_or_host(a), dtype=dtype, order=order or "K", copy=True)
    return _result(host, ())


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray) and not copy:
        return asarray(a, dtype)
    if isinstance(a, ndarray):
        return _result(np.array(a._host, dtype=dtype, order=order, copy=True), ())
    return asarray(a, dtype, order)


def _operand_or_host(a):
    if isinstance(a, (list, tuple)):
        return type(a)(_operand_or_host(e) for e in a)
    return a._host if isinstance(a, ndarray) else a


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


# ndarray methods minirlhf calls, each NumPy's method on the array behind
def _method(name):
    def method(self, *args, **kwargs):
        args = [_operand(a) for a in args]
        kwargs = {k: _operand(v) for k, v in kwargs.items()}
        return _result(getattr(self._host, name)(*args, **kwargs), [self._host, *_host_arrays(args)])
    method.__name__ = name
    return method


for _name in ("all", "any", "argmax", "astype", "clip", "copy", "cumsum", "max", "mean", "min", "prod", "ravel",
              "repeat", "reshape", "squeeze", "std", "sum", "swapaxes", "transpose", "view"):
    setattr(ndarray, _name, _method(_name))


# ------------------------------------------------ random, cupyx, the runtime
class Generator:
    """``cupy.random.Generator``: NumPy's generator, its draws placed on the device."""

    def __init__(self, seed):
        self._numpy = np.random.default_rng(seed)

    def random(self, size=None, dtype=np.float64):
        return _result(np.asarray(self._numpy.random(size, dtype=dtype)), ())

    def standard_normal(self, size=None, dtype=np.float64):
        return _result(np.asarray(self._numpy.standard_normal(size, dtype=dtype)), ())


def _scatter_add(a, slices, value):
    """``cupyx.scatter_add``: a[slices] += value with repeated indices accumulating."""
    np.add.at(a._host, _index(slices), _operand(value))


class RawKernel(cupy_on_cpu.RawKernel):
    @staticmethod
    def memory(a):
        return a._host if isinstance(a, ndarray) else None


class RawModule(cupy_on_cpu.RawModule):
    kernel_type = RawKernel


def module():
    """A fresh ``cupy`` stand-in module (and the ``cupyx`` it needs) with the counts reset."""
    COUNTS.reset()
    cupy = types.ModuleType("cupy", __doc__)
    cupy.__dict__.update(FUNCTIONS, asarray=asarray, array=array, asnumpy=asnumpy)
    cupy.__dict__.update(ndarray=ndarray, RawModule=RawModule, counts=COUNTS, newaxis=None, inf=np.inf, nan=np.nan,
                         pi=np.pi, float32=np.float32, float64=np.float64, int32=np.int32, int64=np.int64,
                         uint8=np.uint8, uint32=np.uint32, uint64=np.uint64, bool_=np.bool_, dtype=np.dtype,
                         finfo=np.finfo, iinfo=np.iinfo)
    cupy.random = types.SimpleNamespace(default_rng=Generator, Generator=Generator)
    cupy.cuda = types.SimpleNamespace(runtime=cupy_on_cpu._runtime())
    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add = _scatter_add
    return cupy, cupyx


def install(monkeypatch):
    """Make ``import cupy`` (and ``cupyx``) give the strict stand-in for one test; minirlhf's cached
    view of CuPy (the module found, the "cuda" generator, compiled kernels) is set aside meanwhile
    and restored afterwards."""
    from minirlhf import backend, kernels
    from minirlhf.kernels import attention
    cupy, cupyx = module()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setattr(backend, "_cupy", cupy)
    monkeypatch.setattr(backend, "_cupy_checked", True)
    monkeypatch.setattr(backend, "_generators", {k: v for k, v in backend._generators.items() if k != "cuda"})
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "_kernels", {})
    monkeypatch.setattr(attention, "_shared_memory_limit",
                        functools.lru_cache(maxsize=None)(attention._shared_memory_limit.__wrapped__))
    return cupy


def pytest_configure(config):
    """Loaded with ``-p cuda_cpu.strict_cupy``: the stand-in is ``cupy`` for the whole session."""
    import pytest
    install(pytest.MonkeyPatch())
