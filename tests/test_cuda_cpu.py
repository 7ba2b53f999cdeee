"""The CPU execution harness (tests/cuda_cpu) catches what a GPU would punish: small kernels with one
defect each, and the whole kernel suite under AddressSanitizer.

The kernels themselves run through the harness in tests/test_kernels.py (its "cuda_cpu" cases).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cuda_cpu import build, cupy_on_cpu

pytestmark = pytest.mark.skipif(build.compiler() is None and os.environ.get("CI") != "true",
                                reason="needs a C++ compiler (g++) for the CPU execution harness")

# each thread copies its 4 floats to shared memory, then reads its neighbour's (thread i + 1)
NEIGHBOUR = """
extern "C" __global__ void __launch_bounds__(64) neighbour(const float* x, float* y) {
    extern __shared__ __align__(16) float tile[];
    const int i = threadIdx.x;
    cp_async_16(tile + 4 * i, x + 4 * i, 16);
    cp_async_commit_group();
    WAIT
    BARRIER
    const int j = (i + 1) % blockDim.x;
    for (int e = 0; e < 4; ++e) y[4 * i + e] = tile[4 * j + e];
}
"""


def launch(cp, source, x, grid=(1,), block=(64,), shared=64 * 16, name="neighbour", opt_in=None):
    kernel = cp.RawModule(code=source).get_function(name)
    if opt_in is not None:
        kernel.max_dynamic_shared_size_bytes = opt_in
    y = cp.zeros(x.shape, dtype=cp.float32)
    kernel(grid, block, (cp.asarray(x), y), shared_mem=shared)
    return y.get()


@pytest.fixture
def cp(monkeypatch):
    return cupy_on_cpu.install(monkeypatch)


@pytest.fixture
def x():
    return np.arange(256, dtype=np.float32)


def test_a_correct_kernel_gives_the_same_bits_under_both_schedules(cp, x):
    y = launch(cp, NEIGHBOUR.replace("WAIT", "cp_async_wait_group<0>();").replace("BARRIER", "__syncthreads();"), x)
    np.testing.assert_array_equal(y, np.roll(x.reshape(64, 4), -1, axis=0).reshape(-1))


def test_a_missing_barrier_makes_the_schedules_differ(cp, x):
    with pytest.raises(AssertionError, match="differs between the two schedules"):
        launch(cp, NEIGHBOUR.replace("WAIT", "cp_async_wait_group<0>();").replace("BARRIER", ""), x)


def test_reading_before_the_wait_group_reads_memory_the_copy_has_not_reached(cp, x):
    source = NEIGHBOUR.replace("WAIT", "").replace("BARRIER", "__syncthreads();")
    with pytest.raises(AssertionError, match="differs between the two schedules"):
        launch(cp, source.replace("tile[4 * j + e];", "tile[4 * j + e]; cp_async_wait_group<0>();"), x)


def test_a_wait_group_that_leaves_the_copy_in_flight_is_caught(cp, x):
    with pytest.raises(RuntimeError, match="cp.async copies in flight"):
        launch(cp, NEIGHBOUR.replace("WAIT", "cp_async_wait_group<1>();").replace("BARRIER", "__syncthreads();"), x)


def test_half_a_warp_in_a_shuffle_while_the_rest_waits_at_a_barrier_is_a_deadlock(cp, x):
    source = NEIGHBOUR.replace("WAIT", "cp_async_wait_group<0>();").replace(
        "BARRIER", "float v = 0.f; if (i % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1); __syncthreads();")
    with pytest.raises(RuntimeError, match="deadlock"):
        launch(cp, source, x)


def test_shared_memory_past_the_launch_size_is_caught(cp, x):
    source = NEIGHBOUR.replace("WAIT", "cp_async_wait_group<0>();").replace("BARRIER", "__syncthreads();")
    with pytest.raises(RuntimeError, match="cp.async: destination is not in shared memory|past the launch"):
        launch(cp, source.replace("tile + 4 * i,", "tile + 4 * i + 4,"), x, shared=64 * 16)
    with pytest.raises(RuntimeError, match="store past the launch's dynamic shared memory"):
        launch(cp, source.replace("const int j", "tile[256] = 0.f; const int j"), x, shared=64 * 16)


def test_unread_shared_memory_holds_nan(cp, x):
    source = NEIGHBOUR.replace("WAIT", "cp_async_wait_group<0>();").replace("BARRIER", "__syncthreads();")
    y = launch(cp, source.replace("cp_async_16(tile + 4 * i, x + 4 * i, 16);", "if (i) cp_async_16(tile + 4 * i, "
                                                                               "x + 4 * i, 16);"), x)
    assert np.isnan(y[63 * 4:]).all() and np.isfinite(y[:63 * 4]).all()


def test_launches_the_driver_would_refuse_are_refused(cp, x):
    source = NEIGHBOUR.replace("WAIT", "cp_async_wait_group<0>();").replace("BARRIER", "__syncthreads();")
    with pytest.raises(RuntimeError, match="invalid grid dimensions"):
        launch(cp, source, x, grid=(1, 65536))
    with pytest.raises(RuntimeError, match="__launch_bounds__"):
        launch(cp, source, np.arange(512, dtype=np.float32), block=(128,))
    with pytest.raises(RuntimeError, match="opt in"):
        launch(cp, source, x, shared=64 * 1024)
    launch(cp, source, x, shared=64 * 1024, opt_in=64 * 1024)
    with pytest.raises(RuntimeError, match="opt in"):
        launch(cp, source, x, shared=228 * 1024, opt_in=228 * 1024)
    with pytest.raises(TypeError, match="NumPy scalar of the kernel's type"):
        cp.RawModule(code=source).get_function("neighbour")((1,), (64,), (cp.asarray(x), 3))


def test_warp_shuffles_exchange_between_lanes(cp):
    source = """
    extern "C" __global__ void warp_sum(const float* x, float* y) {
        float v = x[threadIdx.x];
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        y[threadIdx.x] = v;
    }
    """
    x = np.arange(64, dtype=np.float32)
    y = launch(cp, source, x, block=(64,), shared=0, name="warp_sum")
    np.testing.assert_array_equal(y, np.repeat([x[:32].sum(), x[32:].sum()], 32))


@pytest.mark.skipif(build.sanitizing(), reason="this is the sanitized run")
def test_every_kernel_case_passes_under_address_sanitizer():
    # the .cu sources built with -fsanitize=address,undefined, run through every cuda_cpu case of
    # test_kernels.py: an out-of-bounds global or shared access, or undefined behaviour, aborts
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_kernels.py", "-q", "-x", "-k", "cuda_cpu",
                             "-p", "no:cacheprovider", "-o", "addopts="], cwd=root, env=build.sanitizer_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b[1-9]\d* passed", result.stdout) and "failed" not in result.stdout, result.stdout
