"""Data-parallel training gives the results of one process: each job of tests/data_parallel_job.py runs
once as one process and once as ``mpiexec -n 2`` ranks, and the weights, metrics and gradients agree."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from minirlhf import backend
from minirlhf.distributed import LAUNCHER_VARIABLES, share
from minirlhf.model import GPT, GPTConfig
from minirlhf.sampling import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
TRAINERS = ("sft", "rm", "dpo", "grpo", "grpo_dapo", "rloo", "ppo", "ppo_one_minibatch")

try:
    import mpi4py  # noqa: F401
    MPI_READY = MPIEXEC is not None
except ImportError:
    MPI_READY = False
needs_mpi = pytest.mark.skipif(not MPI_READY, reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")


def job(*args, ranks=None, check=True, timeout=120):
    """Run ``python -m data_parallel_job *args`` as one process (ranks=None) or as ``ranks`` MPI ranks."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "data_parallel_job", *map(str, args)]
    if ranks is not None:
        command = [MPIEXEC, "-n", str(ranks)] + command
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def weights(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every trainer at test size (float64 models), as one process and as two ranks."""
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_ranks")
    job("train", one)
    job("train", two, ranks=2)
    return one, two


# -------------------------------------------------------- the split itself
def test_share_covers_the_rows_once_in_blocks_that_differ_by_at_most_one():
    for n in range(0, 30):
        for size in range(1, 6):
            blocks = [share(n, size, rank) for rank in range(size)]
            assert [i for b in blocks for i in range(n)[b]] == list(range(n))
            lengths = [b.stop - b.start for b in blocks]
            assert max(lengths) - min(lengths) <= 1


def test_a_rows_sample_does_not_depend_on_the_rows_that_share_its_batch():
    """What makes N ranks sample what one process samples: one generator per row."""
    backend.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=12, block_size=16))
    prompts, seeds = [[1, 2, 3], [2, 3], [4, 1, 2, 2]], [11, 12, 13]
    together = generate(model, prompts, 6, seed=seeds, pad_id=0)
    for i in range(3):
        alone = generate(model, prompts[i:i + 1], 6, seed=seeds[i:i + 1], pad_id=0)
        n = alone.tokens.shape[1]
        np.testing.assert_array_equal(alone.tokens[0], together.tokens[i, :n])
        assert not together.mask[i, n:].any()
    with pytest.raises(ValueError, match="one int per row"):
        generate(model, prompts, 2, seed=[1, 2])


def test_without_a_launcher_the_world_is_one_process_and_mpi4py_is_not_imported():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    code = ("import sys, minirlhf.cli, minirlhf.train.stages, minirlhf.distributed as d; w = d.world(); "
            "print(w.size, w.rank, 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": ROOT}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["1", "0", "False"]


# --------------------------------------------------- two ranks = one process
@needs_mpi
@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_ranks_end_with_the_weights_of_one_process(trained, trainer):
    one, two = (weights(os.path.join(folder, f"{trainer}.npz")) for folder in trained)
    for name, value in one.items():
        assert value.dtype == np.float64
        np.testing.assert_allclose(two[name], value, rtol=0, atol=1e-10, err_msg=f"{trainer}: {name}")


@needs_mpi
@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_ranks_log_the_metrics_of_one_process(trained, trainer):
    """Every metric, the loss included, is the global batch's, not a mean of the ranks' own means."""
    one, two = (json.load(open(os.path.join(folder, f"{trainer}.json"))) for folder in trained)
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-9, abs=1e-10), f"{trainer} step {a['step']}: {name}"


@needs_mpi
def test_the_weights_moved(trained):
    """The comparisons above mean something: training moved every trainer's weights."""
    import data_parallel_job as jobs
    from minirlhf.train.ppo import with_value_head
    for trainer in TRAINERS:
        start = (jobs.tiny_reward_model() if trainer == "rm" else with_value_head(jobs.tiny_gpt())
                 if trainer.startswith("ppo") else jobs.tiny_gpt()).state_dict()
        end = weights(os.path.join(trained[0], f"{trainer}.npz"))
        assert max(float(np.abs(end[k] - np.asarray(start[k])).max()) for k in end) > 1e-3, trainer


@needs_mpi
def test_unequal_token_counts_give_the_single_process_gradient(tmp_path):
    """Rank 0 holds 10 response tokens, rank 1 six: weighting each rank's token mean by its share of
    the tokens gives the gradient of the global token mean; the mean of the ranks' means does not."""
    os.makedirs(tmp_path / "one"), os.makedirs(tmp_path / "two")
    job("gradient", tmp_path / "one")
    job("gradient", tmp_path / "two", ranks=2)
    expected = weights(tmp_path / "one" / "gradient.npz")
    summed = weights(tmp_path / "two" / "gradient.npz")
    biased = weights(tmp_path / "two" / "mean_of_means.npz")
    for name, g in expected.items():
        np.testing.assert_allclose(summed[name], g, rtol=0, atol=1e-12, err_msg=name)
    assert max(float(np.abs(biased[k] - expected[k]).max()) for k in expected) > 1e-3


@needs_mpi
def test_a_two_rank_run_killed_mid_way_resumes_to_the_uninterrupted_weights(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    os.makedirs(straight), os.makedirs(interrupted)
    job("resume", straight, ranks=2)
    killed = job("resume", interrupted, "--stop", 3, ranks=2, check=False)
    assert killed.returncode != 0 and "stopped after step 3" in killed.stderr
    assert not os.path.exists(interrupted / "resume.npz")
    job("resume", interrupted, ranks=2)
    expected, resumed = weights(straight / "resume.npz"), weights(interrupted / "resume.npz")
    for name, value in expected.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    assert [m["step"] for m in json.load(open(interrupted / "resume.json"))] == [3, 4]


@needs_mpi
def test_a_rank_raising_ends_the_job_with_its_error_within_seconds(tmp_path):
    started = time.time()
    failed = job("fail", tmp_path, ranks=2, check=False, timeout=60)
    assert failed.returncode != 0
    assert "ValueError: the reward server of rank 1 is down" in failed.stderr
    assert time.time() - started < 30


@needs_mpi
def test_two_ranks_refuse_a_step_with_fewer_prompts_than_ranks(tmp_path):
    failed = job("few", tmp_path, ranks=2, check=False, timeout=60)
    assert failed.returncode != 0
    assert "1 prompts per step for 2 ranks" in failed.stderr


@needs_mpi
def test_mpiexec_minirlhf_sft_writes_one_run_like_one_process(tmp_path):
    """The command line under mpiexec (float32 models): rank 0 writes the run folder and prints the
    result once, and the model is the one process's to float32 rounding."""
    from minirlhf.model import GPT
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    command = [sys.executable, "-m", "minirlhf.cli", "sft", "--quick", "--steps", "3", "--n-heldout", "8",
               "--no-progress", "--out"]
    one = subprocess.run(command + [str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=120)
    two = subprocess.run([MPIEXEC, "-n", "2"] + command + [str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout) == pytest.approx(json.loads(one.stdout), abs=1e-5)  # one JSON object: rank 0's
    assert len(open(tmp_path / "two" / "metrics.jsonl").readlines()) == 3
    expected, got = (GPT.load(str(tmp_path / name / "model")).state_dict() for name in ("one", "two"))
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)


# --------------------------------------------------------------------- GPUs
def gpu_count():
    return backend.cupy_or_none().cuda.runtime.getDeviceCount() if backend.gpu_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(not (MPI_READY and gpu_count() >= 2),
                    reason="needs mpi4py, mpiexec, cupy and two CUDA GPUs (NCCL refuses two ranks on one GPU)")
def test_two_ranks_on_gpus_sum_gradients_with_nccl(tmp_path):
    done = job("nccl", tmp_path, ranks=2)
    assert "nccl ok" in done.stdout
