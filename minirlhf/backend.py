"""Which array module holds a tensor's data, and moving arrays between devices.

NumPy is the reference backend ("cpu"); CuPy is the GPU backend ("cuda").
Following Chainer, every op asks its inputs for their array module
(``xp = get_array_module(x)``) so one code path serves both devices.
CuPy is imported lazily: ``import minirlhf`` works without it, and with it
installed on a machine that has no GPU.
"""
import contextlib
import copy
import os
import threading
import warnings

import numpy as np

_cupy = None
_cupy_checked = False


def cupy_or_none():
    """The ``cupy`` module if it is installed and sees a GPU, else None."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                _cupy = cupy
        except Exception:  # not installed, no driver, or no device
            _cupy = None
    return _cupy


def gpu_available():
    return cupy_or_none() is not None


def is_cupy_array(a):
    return type(a).__module__.split(".")[0] == "cupy"


def array_of(x):
    """The array of a Tensor, or ``x`` itself: a NumPy or CuPy array (whose ``.data`` is its memory, not
    an array), a number or a list."""
    return x if isinstance(x, np.ndarray) or is_cupy_array(x) else getattr(x, "data", x)


def get_array_module(x):
    """``numpy`` or ``cupy``, whichever holds ``x`` (a Tensor or an array)."""
    data = array_of(x)
    if is_cupy_array(data):
        return cupy_or_none() or __import__("cupy")
    return np


def device_of(a):
    return "cuda" if is_cupy_array(a) else "cpu"


def check_device(device):
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not gpu_available():
        raise RuntimeError("device 'cuda' requested, but cupy is not installed or sees no GPU "
                           "(pip install 'minirlhf[gpu]' on a machine with an NVIDIA GPU)")
    return device


def to_device(a, device):
    """Copy array ``a`` to ``device`` ("cpu" or "cuda"); no copy if it is already there."""
    check_device(device)
    if device_of(a) == device:
        return a
    if device == "cuda":
        return cupy_or_none().asarray(a)
    return a.get()


def xp_for(device):
    return cupy_or_none() if check_device(device) == "cuda" else np


def to_numpy(a):
    return a.get() if is_cupy_array(a) else np.asarray(a)


def scatter_add(target, index, values):
    """``target[index] += values`` where repeated indices accumulate (np.add.at)."""
    if is_cupy_array(target):
        import cupyx
        cupyx.scatter_add(target, index, values)
    elif isinstance(index, np.ndarray) and index.ndim == 1 and index.dtype.kind in "iu" and index.size:
        _scatter_add_rows(target, index, values)
    else:
        np.add.at(target, index, values)


def _scatter_add_rows(target, rows, values):
    """``target[rows] += values`` along the first axis on NumPy, faster than np.add.at.

    With the rows sorted, a row repeated at most 8 times (a shared prompt's keys read by a preference
    pair or a GRPO group) takes one pass per repeat: pass k adds each row's k-th value, a fancy-index
    add that is exact since no row repeats within it. Rows repeated more (an embedding's ids) take one
    sum per row, np.add.reduceat over the sorted values. Measured: 128 readers of 64 rows 1088 wide,
    2.2 ms (np.add.at) → 0.14 ms (passes; reduceat 1.2 ms); 2560 ids into 300 rows 64 wide, 1.9 ms →
    0.33 ms (reduceat; passes 1.6 ms).
    """
    rows = np.where(rows < 0, rows + target.shape[0], rows)  # -1 and n − 1 are one row
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_rows[1:] != sorted_rows[:-1]]))
    counts = np.diff(np.append(starts, len(rows)))
    if counts.max() > 8:
        target[sorted_rows[starts]] += np.add.reduceat(_rows_apart(values, order), starts, axis=0)
        return
    rank = np.arange(len(rows)) - np.repeat(starts, counts)  # each value's place among its row's values
    for k in range(counts.max()):
        picked = order[rank == k]
        target[rows[picked]] += values[picked]


def _rows_apart(values, order):
    """values[order] along the first axis; rows a multiple of 1 KB long are copied one 64-byte cache line
    further apart.

    np.add.reduceat along the first axis walks each column down a run of rows; rows a multiple of 1 KB
    apart (256, 512, 768 float32: model widths) fall on a few of the cache's sets and evict each other.
    Measured on the Intel Xeon machine, summing 2688 rows into 276 (an embedding's backward), ms as they
    are → a line apart more: 256 wide 3.13 → 0.70, 512 wide 8.23 → 1.46, 768 wide 10.3 → 3.6; other
    widths gain 10–20% there, about what the copy costs (128 wide 0.60 → 0.53, 320 wide 1.00 → 0.89).
    """
    flat = values.reshape(len(values), -1)
    width = flat.shape[1]
    if (width * flat.itemsize) % 1024:
        return values[order]
    padded = np.empty((len(order), width + 64 // flat.itemsize), dtype=flat.dtype)[:, :width]
    padded[...] = flat[order]
    return padded.reshape((len(order),) + values.shape[1:])


_generators = {}
_replica = threading.local()  # a data-parallel replica's own generators (distributed.replicas)


def _generators_here():
    own = getattr(_replica, "generators", None)
    return _generators if own is None else own


def manual_seed(seed):
    """Seed the generators behind dropout and default parameter initialisation."""
    generators = _generators_here()
    generators.clear()
    generators["seed"] = int(seed)


def generator(device="cpu"):
    """The global random generator of ``device`` (seeded by :func:`manual_seed`); in a replica thread of
    :func:`minirlhf.distributed.replicas`, that replica's own."""
    generators = _generators_here()
    if device not in generators:
        generators[device] = xp_for(device).random.default_rng(generators.get("seed", 0))
    return generators[device]


def copy_generators(generators=None):
    """A copy of ``generators`` (default: the calling thread's): what a replica thread starts from, so
    that N replicas draw what N processes forked from this one would (the same weights from one seed)."""
    generators = _generators_here() if generators is None else generators
    return {name: g if name == "seed" else copy.deepcopy(g) for name, g in generators.items()}


def use_generators(generators):
    """Make ``generators`` (from :func:`copy_generators`) this thread's own; None: the process's again."""
    _replica.generators = generators


@contextlib.contextmanager
def blas_threads(n):
    """NumPy's BLAS limited to ``n`` threads inside the block (process-wide), with threadpoolctl.

    Without threadpoolctl the limit cannot be set from Python once NumPy is loaded: the block runs
    unchanged, with a warning unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS already say ``n``.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        told = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        if told != str(n):
            warnings.warn(f"cannot limit NumPy's BLAS to {n} thread(s): pip install threadpoolctl, or set "
                          f"OPENBLAS_NUM_THREADS={n} before starting Python", RuntimeWarning, stacklevel=3)
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def keep_freed_memory(nbytes=1 << 30):
    """Ask glibc's malloc to serve arrays of up to 32 MiB from its heap and to keep up to ``nbytes``
    of freed heap memory instead of handing it back to the OS (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD); returns whether it could.

    A training step on NumPy allocates and frees the same large temporaries every step. By default
    glibc maps many of them afresh, or trims them off its heap, so each step pays page faults for
    them again. On the project's 2-core machine, one BLAS thread, runs alternating: the GPT of
    ``benchmarks/train_step.py`` trained on its own took 335 and 358 ms a step with glibc's defaults
    (25,000 page faults a step) against 244 and 229 ms with this call (13); the demo's reward model,
    whose arrays are smaller, 10.2–11.1 s for 300 steps (29 faults a step) against 9.97 s in each of
    three runs (with two BLAS threads no clear difference). It changes nothing but speed and memory
    held, and does nothing off glibc (macOS, Windows, musl).
    """
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, int(nbytes)))
