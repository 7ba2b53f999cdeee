"""Shared fixtures: the ``device`` parameter runs a test on NumPy ("cpu") and on CuPy ("cuda").

``pytest --device cpu|cuda|all`` (or MINIRLHF_DEVICE) picks which; the default "all" runs
both and skips the cuda case, with its reason, where cupy or a GPU is missing.
"""
import os

import numpy as np
import pytest
from hypothesis import settings

from minirlhf import backend

# "ci" (the default) draws the same examples on every run, so CI cannot go red at random;
# "thorough" (HYPOTHESIS_PROFILE=thorough) explores new ones: a failure it finds becomes an @example.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
backend.keep_freed_memory()


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("MINIRLHF_DEVICE", "all"),
                     choices=["all", "cpu", "cuda"], help="which backend the device-parametrised tests use")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--device")
        devices = ["cpu", "cuda"] if chosen == "all" else [chosen]
        metafunc.parametrize("device", devices, indirect=True)


@pytest.fixture
def device(request):
    if request.param == "cuda" and not backend.gpu_available():
        pytest.skip("needs cupy and a CUDA GPU")
    return request.param


@pytest.fixture
def xp(device):
    return backend.xp_for(device)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
