"""benchmarks/train_step.py --breakdown: the ops it times compute what they computed, forward and
backward, and are put back afterwards, also when the step fails."""
import os
import sys

import numpy as np
import pytest

import minirlhf.functional as F
from minirlhf import Tensor

BENCHMARKS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


@pytest.fixture(scope="module")
def train_step():
    sys.path.insert(0, BENCHMARKS)
    try:
        import train_step
        yield train_step
    finally:
        sys.path.remove(BENCHMARKS)


def mlp_step(x, w, ln_weight, results):
    def step():
        y = F.gelu(F.layer_norm(F.linear(x, w), (w.shape[0],), ln_weight))
        (y * y).sum().backward()
        results.append((y.data.copy(), x.grad.copy(), w.grad.copy(), ln_weight.grad.copy()))
        for p in (x, w, ln_weight):
            p.grad = None
    return step


def test_breakdown_times_the_ops_it_wraps_and_leaves_what_they_compute(train_step):
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((3, 5, 8)), requires_grad=True)
    w = Tensor(rng.standard_normal((6, 8)), requires_grad=True)
    ln_weight = Tensor(rng.standard_normal(6), requires_grad=True)
    plain, timed = [], []
    mlp_step(x, w, ln_weight, plain)()
    spent, total = train_step.breakdown(mlp_step(x, w, ln_weight, timed), runs=2)
    assert len(timed) == 3  # the warm-up and two timed steps
    for got in timed:
        for a, b in zip(got, plain[0]):
            np.testing.assert_array_equal(a, b)
    assert set(spent) == set(train_step.TIMED_OPS)
    assert spent["linear"] > 0 and spent["gelu"] > 0 and spent["layer_norm"] > 0
    assert spent["scaled_dot_product_attention"] == 0  # not called by this step
    assert sum(spent.values()) <= total


def test_breakdown_puts_the_ops_back_when_the_step_fails(train_step):
    originals = {name: getattr(F, name) for name in train_step.TIMED_OPS}

    def failing():
        assert F.linear is not originals["linear"]  # wrapped while the step runs
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        train_step.breakdown(failing, runs=1)
    assert {name: getattr(F, name) for name in train_step.TIMED_OPS} == originals


def test_the_replicated_step_is_the_whole_batchs_step(train_step):
    """--replicas: two replicas, each on half the rows, take the step one process takes on all of them."""
    from minirlhf.distributed import replicas

    def two_steps():
        _, model, _, step = train_step.minirlhf_step(batch=4, seq=16)
        losses = [step(), step()]
        return losses, {k: v.copy() for k, v in model.state_dict().items()}

    (one_losses, one), (two_losses, two) = two_steps(), replicas(2, two_steps)
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    for name, value in one.items():  # AdamW moves a weight by ~lr = 1e-4 a step, whatever the gradient's size:
        np.testing.assert_allclose(two[name], value, rtol=0, atol=1e-5, err_msg=name)  # float32 rounding apart
    _, start, _, _ = train_step.minirlhf_step(batch=4, seq=16)
    moved = max(float(np.abs(one[k] - start.state_dict()[k]).max()) for k in one)
    assert moved > 1.5e-4  # two steps moved the weights, so agreeing means something


def test_without_ops_passes_the_input_through_and_puts_the_ops_back(train_step):
    """--floor: inside ``without_ops`` GELU and layer norm give x and attention gives v, each with the
    output's gradient as their input's; outside, and after a failure, the real ops are back."""
    originals = {name: getattr(F, name) for name in train_step.FLOOR_OPS}
    rng = np.random.default_rng(1)
    q, k, v = (Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True) for _ in range(3))
    ln_weight = Tensor(rng.standard_normal(4), requires_grad=True)
    g = rng.standard_normal((2, 3, 4)).astype(v.dtype)
    with train_step.without_ops():
        y = F.layer_norm(F.gelu(F.scaled_dot_product_attention(q, k, v, is_causal=True)), (4,), ln_weight)
        np.testing.assert_array_equal(y.data, v.data)
        (y * Tensor(g)).sum().backward()
    np.testing.assert_array_equal(v.grad, g)
    assert q.grad is None and k.grad is None and ln_weight.grad is None
    assert {name: getattr(F, name) for name in train_step.FLOOR_OPS} == originals
    with pytest.raises(RuntimeError, match="step failed"), train_step.without_ops():
        raise RuntimeError("step failed")
    assert {name: getattr(F, name) for name in train_step.FLOOR_OPS} == originals
    assert not np.array_equal(F.gelu(q).data, q.data)


def test_the_floor_step_trains_the_gpt_without_the_three_ops(train_step):
    """The floor's step runs the benchmark's GPT with the three ops passed through, and still moves every
    weight the linear layers and embeddings hold."""
    _, model, _, step = train_step.minirlhf_step(batch=2, seq=8)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with train_step.without_ops():
        loss = step()
    assert np.isfinite(loss)
    after = model.state_dict()
    for name in ("h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight", "wte.weight"):
        assert not np.array_equal(after[name], before[name]), name


def test_torch_kernels_run_the_three_ops_on_the_steps_shapes(train_step):
    torch = pytest.importorskip("torch")
    cfg, _, _, _ = train_step.minirlhf_step(batch=2, seq=8)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        train_step.torch_kernels(cfg, 2, 8)()
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert calls == [(2, cfg.n_head, 8, cfg.n_embd // cfg.n_head)] * cfg.n_layer
