"""Data-parallel training gives the results of one process: each job of tests/data_parallel_job.py runs
once as one process, once as ``mpiexec -n 2`` ranks and once as two replica threads of one process
(``distributed.replicas``), and the weights, metrics and gradients agree."""
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from minirlhf import backend
from minirlhf.distributed import LAUNCHER_VARIABLES, replicas, share, world
from minirlhf.model import GPT, GPTConfig
from minirlhf.sampling import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
TRAINERS = ("sft", "rm", "dpo", "grpo", "grpo_dapo", "rloo", "ppo", "ppo_one_minibatch", "ppo_two_samples")

try:
    import mpi4py  # noqa: F401
    MPI_READY = MPIEXEC is not None
except ImportError:
    MPI_READY = False
needs_mpi = pytest.mark.skipif(not MPI_READY, reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")


WAYS = ("mpi", "threads")  # two MPI ranks, two replica threads
needs_way = {"mpi": [needs_mpi], "threads": []}


def job(*args, ranks=None, way="mpi", check=True, timeout=120):
    """Run ``python -m data_parallel_job *args`` as one process (ranks=None), or as ``ranks`` MPI ranks
    (way="mpi") or replica threads (way="threads")."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "data_parallel_job", *map(str, args)]
    if ranks is not None and way == "threads":
        command += ["--replicas", str(ranks)]
    elif ranks is not None:
        command = [MPIEXEC, "-n", str(ranks)] + command
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def weights(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Every trainer at test size (float64 models), as one process."""
    one = tmp_path_factory.mktemp("one_process")
    job("train", one)
    return one


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The same, as two MPI ranks."""
    two = tmp_path_factory.mktemp("two_ranks")
    job("train", two, ranks=2)
    return two


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """The same, as two replica threads of one process."""
    two = tmp_path_factory.mktemp("two_replicas")
    job("train", two, ranks=2, way="threads")
    return two


@pytest.fixture
def trained(request, one_process):
    """(one process's folder, the two ranks' or replicas' folder) for the test's ``way``."""
    way = request.node.callspec.params["way"]
    return one_process, request.getfixturevalue("two_ranks" if way == "mpi" else "two_replicas")


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
@pytest.mark.parametrize("way", [pytest.param(w, marks=needs_way[w]) for w in WAYS])
@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_ranks_end_with_the_weights_of_one_process(trained, trainer, way):
    one, two = (weights(os.path.join(folder, f"{trainer}.npz")) for folder in trained)
    for name, value in one.items():
        assert value.dtype == np.float64
        np.testing.assert_allclose(two[name], value, rtol=0, atol=1e-10, err_msg=f"{trainer}: {name}")


@pytest.mark.parametrize("way", [pytest.param(w, marks=needs_way[w]) for w in WAYS])
@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_ranks_log_the_metrics_of_one_process(trained, trainer, way):
    """Every metric, the loss included, is the global batch's, not a mean of the ranks' own means."""
    one, two = (json.load(open(os.path.join(folder, f"{trainer}.json"))) for folder in trained)
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-9, abs=1e-10), f"{trainer} step {a['step']}: {name}"


def test_the_weights_moved(one_process):
    """The comparisons above mean something: training moved every trainer's weights."""
    import data_parallel_job as jobs
    from minirlhf.train.ppo import with_value_head
    for trainer in TRAINERS:
        start = (jobs.tiny_reward_model() if trainer == "rm" else with_value_head(jobs.tiny_gpt())
                 if trainer.startswith("ppo") else jobs.tiny_gpt()).state_dict()
        end = weights(os.path.join(one_process, f"{trainer}.npz"))
        assert max(float(np.abs(end[k] - np.asarray(start[k])).max()) for k in end) > 1e-3, trainer


@pytest.mark.parametrize("way", [pytest.param(w, marks=needs_way[w]) for w in WAYS])
def test_unequal_token_counts_give_the_single_process_gradient(tmp_path, way):
    """Rank 0 holds 10 response tokens, rank 1 six: weighting each rank's token mean by its share of
    the tokens gives the gradient of the global token mean; the mean of the ranks' means does not."""
    os.makedirs(tmp_path / "one"), os.makedirs(tmp_path / "two")
    job("gradient", tmp_path / "one")
    job("gradient", tmp_path / "two", ranks=2, way=way)
    expected = weights(tmp_path / "one" / "gradient.npz")
    summed = weights(tmp_path / "two" / "gradient.npz")
    biased = weights(tmp_path / "two" / "mean_of_means.npz")
    for name, g in expected.items():
        np.testing.assert_allclose(summed[name], g, rtol=0, atol=1e-12, err_msg=name)
    assert max(float(np.abs(biased[k] - expected[k]).max()) for k in expected) > 1e-3


@pytest.mark.parametrize("way", [pytest.param(w, marks=needs_way[w]) for w in WAYS])
def test_a_two_rank_run_killed_mid_way_resumes_to_the_uninterrupted_weights(tmp_path, way):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    os.makedirs(straight), os.makedirs(interrupted)
    job("resume", straight, ranks=2, way=way)
    killed = job("resume", interrupted, "--stop", 3, ranks=2, way=way, check=False)
    assert killed.returncode != 0 and "stopped after step 3" in killed.stderr
    assert not os.path.exists(interrupted / "resume.npz")
    job("resume", interrupted, ranks=2, way=way)
    expected, resumed = weights(straight / "resume.npz"), weights(interrupted / "resume.npz")
    for name, value in expected.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    assert [m["step"] for m in json.load(open(interrupted / "resume.json"))] == [3, 4]


@pytest.mark.parametrize("way", [pytest.param(w, marks=needs_way[w]) for w in WAYS])
def test_a_rank_raising_ends_the_job_with_its_error_within_seconds(tmp_path, way):
    started = time.time()
    failed = job("fail", tmp_path, ranks=2, way=way, check=False, timeout=60)
    assert failed.returncode != 0
    assert "ValueError: the reward server of rank 1 is down" in failed.stderr
    assert time.time() - started < 30


@pytest.mark.parametrize("way", [pytest.param(w, marks=needs_way[w]) for w in WAYS])
def test_two_ranks_refuse_a_step_with_fewer_prompts_than_ranks(tmp_path, way):
    failed = job("few", tmp_path, ranks=2, way=way, check=False, timeout=60)
    assert failed.returncode != 0
    assert "1 prompts per step for 2 ranks" in failed.stderr


@pytest.mark.parametrize("way", [pytest.param(w, marks=needs_way[w]) for w in WAYS])
def test_mpiexec_minirlhf_sft_writes_one_run_like_one_process(tmp_path, way):
    """The command line under mpiexec or with --replicas 2 (float32 models): rank 0 writes the run folder
    and prints the result once, and the model is the one process's to float32 rounding."""
    from minirlhf.model import GPT
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    command = [sys.executable, "-m", "minirlhf.cli", "sft", "--quick", "--steps", "3", "--n-heldout", "8",
               "--no-progress", "--out"]
    one = subprocess.run(command + [str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=120)
    two = (command + [str(tmp_path / "two"), "--replicas", "2"] if way == "threads"
           else [MPIEXEC, "-n", "2"] + command + [str(tmp_path / "two")])
    two = subprocess.run(two, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout) == pytest.approx(json.loads(one.stdout), abs=1e-5)  # one JSON object: rank 0's
    assert len(open(tmp_path / "two" / "metrics.jsonl").readlines()) == 3
    expected, got = (GPT.load(str(tmp_path / name / "model")).state_dict() for name in ("one", "two"))
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)


# ------------------------------------------------------- replica threads
def test_replicas_meet_in_collectives_with_the_same_results_in_rank_order():
    def replica():
        w = world()
        return (w.rank, w.size, w.sum(float(w.rank + 1)), w.sum(np.arange(3.0) * (w.rank + 1)), w.max(w.rank * 2),
                w.gather(np.full((w.rank + 1, 2), w.rank)))

    seen = []
    replicas(3, lambda: seen.append(replica()))
    assert sorted(r[0] for r in seen) == [0, 1, 2] and {r[1] for r in seen} == {3}
    for _, _, total, array, top, rows in seen:
        assert total == 6.0 and top == 4
        np.testing.assert_array_equal(array, [0.0, 6.0, 12.0])
        np.testing.assert_array_equal(rows, [[0, 0], [1, 1], [1, 1], [2, 2], [2, 2], [2, 2]])
    assert world().size == 1  # the calling thread is one process again


def test_replicas_sum_gradients_as_the_ranks_do_and_keep_an_unreached_gradient_none():
    from minirlhf.tensor import Tensor
    grads = {0: [np.float32([1.5, 2.0]), None, None], 1: [np.float32([0.25, -1.0]), np.float32([3.0]), None]}

    def replica():
        params = [Tensor(np.zeros(2, np.float32)), Tensor(np.zeros(1, np.float32)), Tensor(np.zeros(1, np.float32))]
        for p, g in zip(params, grads[world().rank]):
            p.grad = g
        world().sum_gradients(params)
        return [p.grad for p in params]

    out = []
    replicas(2, lambda: out.append(replica()))
    for summed in out:
        np.testing.assert_array_equal(summed[0], [1.75, 1.0])
        assert summed[0].dtype == np.float32
        np.testing.assert_array_equal(summed[1], [3.0])  # only replica 1 reached it
        assert summed[2] is None


def test_replicas_start_from_copies_of_the_callers_generators():
    """As processes forked from the caller: the same draws in every replica, and none taken from the caller."""
    backend.manual_seed(5)
    backend.generator().random()  # the caller's stream has moved on: replicas continue from here
    expected = backend.copy_generators()["cpu"].random(3)
    drawn = []
    replicas(2, lambda: drawn.append(backend.generator().random(3)))
    for d in drawn:
        np.testing.assert_array_equal(d, expected)
    np.testing.assert_array_equal(backend.generator().random(3), expected)  # the caller's is untouched
    backend.manual_seed(5)

    def seeded_model():
        backend.manual_seed(3)
        return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=12, block_size=8)).state_dict()
    models = []
    replicas(2, lambda: models.append(seeded_model()))
    for name, value in seeded_model().items():
        for m in models:
            np.testing.assert_array_equal(m[name], value)


def test_a_replica_that_raises_stops_the_others_and_its_error_is_raised():
    started = time.time()

    def replica():
        if world().rank == 1:
            raise KeyError("replica 1 failed")
        world().barrier()  # would wait forever for replica 1

    with pytest.raises(KeyError, match="replica 1 failed"):
        replicas(2, replica)
    assert time.time() - started < 10


def test_a_replica_that_returns_early_makes_the_others_collective_raise():
    def replica():
        if world().rank == 0:
            return "done"
        world().sum(1.0)

    with pytest.raises(RuntimeError, match="replica 1 of 2: another replica stopped"):
        replicas(2, replica)


def test_replicas_refuse_a_bad_count_and_nesting():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n must be a positive int"):
            replicas(bad, lambda: None)
    assert replicas(1, lambda x: x + 1, 1) == 2  # one replica: the call itself
    with pytest.raises(ValueError, match="not both"):
        replicas(2, lambda: replicas(2, lambda: None))


def test_replicas_limit_blas_to_one_thread_and_restore_it():
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="blas_threads sets the limit with threadpoolctl")

    def blas():
        return max((p["num_threads"] for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"),
                   default=None)
    before = blas()
    if before is None:
        pytest.skip("threadpoolctl sees no BLAS library in this process")
    inside = []
    replicas(2, lambda: inside.append(blas()))
    assert inside == [1, 1]
    assert blas() == before


def test_blas_threads_without_threadpoolctl_warns_unless_the_environment_already_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    with pytest.warns(RuntimeWarning, match="pip install threadpoolctl"):
        with backend.blas_threads(1):
            pass
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with backend.blas_threads(1):
            pass


def test_cli_refuses_a_bad_replica_count(capsys):
    from minirlhf.cli import main
    with pytest.raises(SystemExit):
        main(["sft", "--out", "unused", "--replicas", "0"])
    assert "--replicas: expected a positive integer, got '0'" in capsys.readouterr().err


# --------------------------------------------------------------------- GPUs
def gpu_count():
    return backend.cupy_or_none().cuda.runtime.getDeviceCount() if backend.gpu_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(not (MPI_READY and gpu_count() >= 2),
                    reason="needs mpi4py, mpiexec, cupy and two CUDA GPUs (NCCL refuses two ranks on one GPU)")
def test_two_ranks_on_gpus_sum_gradients_with_nccl(tmp_path):
    done = job("nccl", tmp_path, ranks=2)
    assert "nccl ok" in done.stdout
