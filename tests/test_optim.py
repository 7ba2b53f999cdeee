"""Optimizers, gradient clipping and the learning-rate schedule, against torch.optim."""
import math

import numpy as np
import pytest

from minirlhf import Tensor, nn, optim


def _start(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 4)), rng.standard_normal(4)]


def _loss(w, b, np_or_torch=None):
    """A small non-quadratic loss, written once for both engines: Σ tanh(X w + b)² + Σ w⁴ / 4."""
    x = np.linspace(-1, 1, 6).reshape(2, 3)
    if np_or_torch is None:
        return ((Tensor(x, dtype=np.float64) @ w + b).tanh() ** 2).sum() + (w ** 4).sum() * 0.25
    torch = np_or_torch
    return ((torch.from_numpy(x) @ w + b).tanh() ** 2).sum() + (w ** 4).sum() * 0.25


def _trajectories(make_ours, make_theirs, steps=10, groups=None):
    """Parameters after each step, ours and torch's, from the same start."""
    torch = pytest.importorskip("torch")
    start = _start()
    ours = [nn.Parameter(a, dtype=np.float64) for a in start]
    theirs = [torch.tensor(a, requires_grad=True) for a in start]
    opt = make_ours(ours if groups is None else groups(ours))
    opt_t = make_theirs(theirs if groups is None else groups(theirs))
    path, path_t = [], []
    for _ in range(steps):
        opt.zero_grad()
        _loss(*ours).backward()
        opt.step()
        opt_t.zero_grad()
        _loss(*theirs, torch).backward()
        opt_t.step()
        path.append([p.numpy() for p in ours])
        path_t.append([p.detach().numpy().copy() for p in theirs])
    return path, path_t


def _assert_same_path(path, path_t, tol):
    moved = np.abs(path[-1][0] - _start()[0]).max()
    assert moved > 1e-3, "the parameters barely moved; the comparison would be vacuous"
    for step, (ps, ps_t) in enumerate(zip(path, path_t)):
        for p, p_t in zip(ps, ps_t):
            np.testing.assert_allclose(p, p_t, rtol=tol, atol=tol, err_msg=f"step {step + 1}")


def test_adamw_trajectory_with_weight_decay_equals_torch():
    torch = pytest.importorskip("torch")
    kw = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    _assert_same_path(*_trajectories(lambda ps: optim.AdamW(ps, **kw), lambda ps: torch.optim.AdamW(ps, **kw)),
                      tol=1e-6)


def test_adamw_param_groups_equal_torch():
    torch = pytest.importorskip("torch")

    def groups(ps):
        return [{"params": [ps[0]], "weight_decay": 0.2}, {"params": [ps[1]], "lr": 0.01, "weight_decay": 0.0}]
    _assert_same_path(*_trajectories(lambda g: optim.AdamW(g, lr=0.05), lambda g: torch.optim.AdamW(g, lr=0.05),
                                     groups=groups), tol=1e-6)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05)])
def test_sgd_trajectory_equals_torch(momentum, weight_decay):
    torch = pytest.importorskip("torch")
    kw = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay)
    _assert_same_path(*_trajectories(lambda ps: optim.SGD(ps, **kw), lambda ps: torch.optim.SGD(ps, **kw)),
                      tol=1e-10)


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda ps: optim.AdamW(ps, lr=0.1, weight_decay=0.1)])
def test_an_optimizer_step_does_not_modify_grad(make):
    params = [nn.Parameter(a, dtype=np.float64) for a in _start()]
    opt = make(params)
    for _ in range(3):
        opt.zero_grad()
        _loss(*params).backward()
        before = [p.grad.copy() for p in params]
        for _ in range(2):       # a second step on the same gradient must not see it changed by the first
            opt.step()
            for p, g in zip(params, before):
                np.testing.assert_array_equal(p.grad, g)


def test_parameters_without_a_gradient_are_left_alone():
    params = [nn.Parameter(a, dtype=np.float64) for a in _start()]
    frozen = params[1].numpy()
    opt = optim.AdamW(params, lr=0.1, weight_decay=0.5)
    (params[0] ** 2).sum().backward()
    opt.step()
    np.testing.assert_array_equal(params[1].numpy(), frozen)


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
                                  lambda ps: optim.AdamW(ps, lr=0.05)])
def test_optimizer_state_dict_resumes_the_same_trajectory(make):
    params = [nn.Parameter(a, dtype=np.float64) for a in _start()]
    opt = make(params)
    for _ in range(3):
        opt.zero_grad()
        _loss(*params).backward()
        opt.step()
    copies = [nn.Parameter(p.numpy(), dtype=np.float64) for p in params]
    resumed = make(copies)
    resumed.load_state_dict(opt.state_dict())
    for ps, o in ((params, opt), (copies, resumed)):
        for _ in range(3):
            o.zero_grad()
            _loss(*ps).backward()
            o.step()
    for p, q in zip(params, copies):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_loading_optimizer_state_of_the_wrong_shape_names_the_buffer():
    params = [nn.Parameter(a, dtype=np.float64) for a in _start()]
    opt = optim.AdamW(params)
    _loss(*params).backward()
    opt.step()
    state = opt.state_dict()
    state["buffers"]["0.m"] = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"buffer 0.m has shape \(4, 3\), parameter \(3, 4\)"):
        optim.AdamW([nn.Parameter(a) for a in _start()]).load_state_dict(state)


def test_bad_hyperparameters_name_the_argument_and_value():
    p = [nn.Parameter(np.ones(2))]
    with pytest.raises(ValueError, match="AdamW: lr must be a finite number >= 0, got -1"):
        optim.AdamW(p, lr=-1)
    with pytest.raises(ValueError, match=r"AdamW: betas must be in \[0, 1\), got \(0.9, 1.0\)"):
        optim.AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="SGD: momentum must be in"):
        optim.SGD(p, momentum=1.5)
    with pytest.raises(ValueError, match="SGD: params is empty"):
        optim.SGD([])


# ------------------------------------------------------------ clipping
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
@pytest.mark.parametrize("make, name", [
    (lambda ps, v: optim.SGD(ps, lr=v), "SGD: lr"), (lambda ps, v: optim.SGD(ps, weight_decay=v), "SGD: weight_decay"),
    (lambda ps, v: optim.AdamW(ps, lr=v), "AdamW: lr"),
    (lambda ps, v: optim.AdamW(ps, weight_decay=v), "AdamW: weight_decay"),
    (lambda ps, v: optim.AdamW([{"params": ps, "lr": v}]), "AdamW: lr"),
    (lambda ps, v: optim.clip_grad_norm_(ps, v), "clip_grad_norm_: max_norm"),
])
def test_non_finite_or_negative_settings_are_refused_by_name(make, name, bad):
    """`--lr inf`, `--clip nan` and `--weight-decay nan` (or < 0) trained NaN models and exited 0."""
    params = [nn.Parameter(np.ones(3))]
    params[0].grad = np.ones(3, dtype=params[0].dtype)
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got {bad}"):
        make(params, bad)
    np.testing.assert_array_equal(params[0].grad, 1.0)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_equals_torch(max_norm):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal((3, 4)), rng.standard_normal(5), rng.standard_normal(())]
    ours = [nn.Parameter(np.zeros_like(g), dtype=np.float64) for g in grads]
    theirs = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for p, p_t, g in zip(ours, theirs, grads):
        p.grad, p_t.grad = g.copy(), torch.from_numpy(g.copy())
    norm = optim.clip_grad_norm_(ours, max_norm)
    norm_t = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert float(norm) == pytest.approx(float(norm_t), rel=1e-12)
    for p, p_t in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, p_t.grad.numpy(), rtol=1e-12)
    clipped = math.sqrt(sum((p.grad ** 2).sum() for p in ours))
    assert clipped == pytest.approx(min(max_norm, float(norm)), rel=1e-5)


def test_clip_grad_norm_skips_parameters_without_gradients():
    p, q = nn.Parameter(np.ones(4)), nn.Parameter(np.ones(4))
    p.grad = np.full(4, 2.0, dtype=np.float32)
    assert float(optim.clip_grad_norm_([p, q], 1.0)) == pytest.approx(4.0)
    assert q.grad is None and p.grad.dtype == np.float32
    assert optim.clip_grad_norm_([q], 1.0) == 0.0


# ------------------------------------------------------------ schedule
def test_cosine_schedule_warms_up_linearly_then_decays_to_min_lr():
    lr = [optim.cosine_lr(s, max_lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.1) for s in range(16)]
    np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0])
    assert lr[4] == pytest.approx(1.0)
    assert lr[9] == pytest.approx(0.55)                         # halfway: (max + min) / 2
    assert lr[7] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.3)))
    assert lr[14] == lr[15] == 0.1
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))


def test_cosine_decay_equals_torch_cosine_annealing():
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.01)
    for step in range(20):
        assert optim.cosine_lr(step, 0.3, 0, 20, 0.01) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()


def test_warmup_cosine_sets_every_groups_lr_each_step():
    a, b = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    opt = optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    sched = optim.WarmupCosine(opt, warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(7):
        seen.append([g["lr"] for g in opt.param_groups])
        sched.step()
    np.testing.assert_allclose([s[0] for s in seen], [optim.cosine_lr(s, 1.0, 2, 6) for s in range(7)])
    np.testing.assert_allclose([s[1] for s in seen], [optim.cosine_lr(s, 0.1, 2, 6) for s in range(7)])


def test_adamw_bias_correction_counts_steps_per_parameter_as_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    a0, b0 = rng.standard_normal(5), rng.standard_normal(3)
    a, b = nn.Parameter(a0, dtype=np.float64), nn.Parameter(b0, dtype=np.float64)
    ta, tb = torch.tensor(a0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    opt = optim.AdamW([a, b], lr=0.1, weight_decay=0.1)
    topt = torch.optim.AdamW([ta, tb], lr=0.1, weight_decay=0.1)
    for i in range(10):
        a.grad, ta.grad = np.sin(a.data + i), torch.sin(ta.detach() + i)
        if i >= 3:  # b joins late: its first update must use bias correction of step 1
            b.grad, tb.grad = np.cos(b.data * i), torch.cos(tb.detach() * i)
        opt.step()
        topt.step()
    np.testing.assert_allclose(a.data, ta.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(b.data, tb.detach().numpy(), atol=1e-12)
