"""Every RLHF loss, one function each, with its formula and paper in the docstring.

The equations, in the order of this file. m_t is the response mask, log r_t = log π(y_t) −
log π_ref(y_t), ρ_t = π(y_t)/π_old(y_t), σ the logistic function, A an advantage:

  masked_token_logprobs  m_t · log π(y_t | x, y_<t)
  sequence_logprobs      log π(y|x) = Σ_t m_t log π(y_t | x, y_<t)
  masked_mean            Σ m x / Σ m
  whiten                 (x − μ) / (σ + eps) over the masked-in entries
  sft_loss               −Σ m log π(y_t) / Σ m                          InstructGPT (Ouyang et al. 2022), §3.5
  bradley_terry_loss     −log σ(r_w − r_l − margin)                     Ouyang et al. 2022, eq. 1
  kl_exact               Σ_v π(v) log(π(v)/π_ref(v))
  kl_estimate            k1 = log r,  k2 = ½ (log r)²,  k3 = 1/r − 1 + log r    Schulman 2020
  response_kl            Σ_t m_t k(y_t)
  kl_penalty             r_t = −β k(y_t) + [t last] · score             Ziegler et al. 2019, eq. 2
  AdaptiveKLController   β ← β (1 + clip(KL/target − 1, ±0.2) · n/H)    Ziegler et al. 2019, §2.2
  rloo_advantages        A_i = r_i − mean_{j≠i} r_j                      Kool et al. 2019; Ahmadian et al. 2024
  reinforce_loss         −mean_i (R_i − b_i) Σ_t m log π(y_t)            Williams 1992
  gae                    A_t = δ_t + γλ A_{t+1},  δ_t = r_t + γ V_{t+1} − V_t     Schulman et al. 2016, eq. 16
  reinforce_pp_advantages  whiten(Σ_{s>=t} γ^{s−t} r_s)                  Hu 2025 (REINFORCE++)
  ppo_policy_loss        −min(ρ A, clip(ρ, 1−ε, 1+ε) A)                  Schulman et al. 2017, eq. 7
  ppo_value_loss         ½ max((V − R)², (V_clip − R)²)                  Schulman et al. 2017; baselines' ppo2
  entropy                −Σ_v π(v) log π(v)                              Schulman et al. 2017, eq. 9
  grpo_advantages        (r_i − mean_group r) / (std + eps)              Shao et al. 2024, §4.1.2
  grpo_loss              −min(ρ A, clip(ρ, 1−ε, 1+ε) A) + β k3           Shao et al. 2024, eqs. 3–4
  gspo_loss              the same with s_i = exp(mean_t log ρ_t)         Zheng et al. 2025
  dpo_loss               −log σ(β h),  h = log π/π_ref (y_w) − log π/π_ref (y_l)   Rafailov et al. 2023, eq. 7
  simpo_loss             −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ)      Meng et al. 2024, eq. 6
  orpo_loss              NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l))        Hong et al. 2024, eqs. 6–7
  kto_loss               λ_y − v(y),  v = λ σ(±β(log r − z0))            Ethayarajh et al. 2024, §4
  kto_reference_point    z0 = max(0, mean log π/π_ref of mismatched pairs)   Ethayarajh et al. 2024, §4.1

The loss menu (after the classics):

  reinforce_pp_baseline_advantages  whiten_batch(r − mean_group r)        Hu et al. 2025
  remax_advantages       r(y) − r(greedy ȳ)                              Li et al. 2023, Algorithm 1
  pass_at_k_advantages   mean best-of-k reward of the k-subsets holding i, minus R̄   Chen et al. 2025, eqs. 14–15
  cispo_loss             −sg(clip(ρ, 1−ε_low, 1+ε_high)) A log π          MiniMax-M1 2025, eq. 4
  gmpo_loss              −A exp(mean_t clip(log ρ_t))                     Zhao et al. 2025
  sapo_loss              −(4/τ) σ(τ(ρ − 1)) A                             Gao et al. 2025
  clip_cov_loss          PPO, with random high-covariance tokens cut off  Cui et al. 2025, §5
  kl_cov_loss            −ρ A + k |log ρ| on the top-covariance tokens    Cui et al. 2025, §5
  rollout_correction_weights  min(ρ, C) per token or sequence; ρ·[ρ <= C]; ρ·[a <= ρ <= b]   TIS, MIS, IcePop
  overlong_penalty       −clip((|y| − L_max + L_cache) / L_cache, 0, 1)   Yu et al. 2025 (DAPO), eq. 13
  informative_groups     groups with 0 < #correct < G                     Yu et al. 2025 (DAPO), eq. 11
  and options of the classics: grpo/rloo_advantages(index=...) for groups of any size; kl_estimate's
  "abs", "k1+", "k3+"; dpo_loss's rpo_alpha (Pang et al. 2024), "ipo_norm" (TRL's IPO) and
  f_divergence (Wang et al. 2023)

Argument checks and conversions live in ``minirlhf/_checks.py``; the differentiable pieces
the losses share (token_logprobs, k3, log1mexp) in ``minirlhf/functional.py``.

Conventions (shared by every function below):

* Per-token quantities are Tensors of shape (B, T) — ``logp[i, t] = log π(y_t | x, y_<t)``
  for row i — with a 0/1 ``mask`` of the same shape (a NumPy/CuPy array or a Tensor)
  that is 1 on response tokens. Per-sequence quantities have shape (B,).
* Masked-out positions never contribute: every per-token input is passed through
  ``where(mask, x, 0)`` first, so whatever sits under the mask (padding, NaN, 1e30)
  changes neither a loss nor a gradient, and an all-masked row gives 0, never NaN; so does
  a batch of no rows (B = 0) or no positions (T = 0), statistics included.
* Only the policy's log-probs (and values, logits) carry gradient; old log-probs,
  reference log-probs, advantages, returns, rewards and KL anchors are detached here,
  so a caller cannot leak gradient into them by accident.
* Diagnostics come back as 0-d arrays of the input's backend (``float(x)`` reads one);
  nothing in the loss math calls ``.item()``, so a GPU step never waits on the host (the
  exceptions: the advantage estimators check their rewards — NaN and inf, 0/1 for pass@k — one
  sync per batch; clip_cov_loss and kl_cov_loss pick their tokens on the host).
* Settings (β, ε, clip ranges, weights) must be finite numbers: inf or NaN is refused by name.
* Groups (GRPO, RLOO) are consecutive rows: ``rewards.reshape(B // G, G)``; where a function
  takes ``index``, rows with equal ids form a group of any size (a group of one gets 0).
"""
import math

import numpy as np

from . import backend
from . import functional as F
from .tensor import Tensor
from ._checks import (_array, _check_clip, _check_finite, _check_int_range, _check_nonnegative, _check_option,
                      _check_positive, _const, _group_index, _groups, _is_real, _mask, _num_tokens, _per_sequence,
                      _per_token, _tensor)

token_logprobs = F.token_logprobs
log1mexp = F.log1mexp
_k3_op = F.k3

# |log-ratio| above this is clipped before exp(): e^20 ≈ 4.9e8 is already far outside any
# trust region, and float32 exp overflows at 88.
MAX_LOG_RATIO = 20.0


# ------------------------------------------------- masks (the conventions above)
def _keep(x, m):
    """x where the mask is 1, else 0; no gradient reaches (and no NaN leaks from) masked positions."""
    return F.where(m > 0, x, 0.0)


def _safe_log_ratio(logp, base_logp):
    return F.clip(logp - base_logp, -MAX_LOG_RATIO, MAX_LOG_RATIO)


def _fraction(flags, m):
    """Share of masked-in positions where ``flags`` holds (a 0-d array; 0 for an empty mask)."""
    xp = backend.get_array_module(m)
    return (flags * m).sum() / xp.maximum(m.sum(), 1.0)


def _row_mean(x):
    """Mean over the rows (pairs, sequences) of x, Tensor or array; 0 for a batch of no rows."""
    return x.sum() / max(x.shape[0], 1)


def _unbiased_std(centred, n, axis):
    """sqrt(Σ c² / (n − 1)) of n values already centred (0 where masked out), computed as s · std(c/s)
    with s = max |c| so that the squares cannot overflow (float32 rewards of 1e20 square to inf)."""
    xp = backend.get_array_module(centred)
    s = xp.abs(centred).max(axis=axis, keepdims=axis is not None)
    u = centred / xp.where(s > 0, s, 1)
    return s * xp.sqrt((u * u).sum(axis=axis, keepdims=axis is not None) / xp.maximum(n - 1, 1.0))


# ------------------------------------------------------- log-probs and means
def masked_token_logprobs(logits, targets, mask):
    """log π(y_t | x, y_<t) where mask is 1, else 0: shape (B, T).

    logits (B, T, V) predict targets (B, T) (already shifted: logits[:, t] scores
    targets[:, t]); mask (B, T) is 1 on response tokens. Targets under the mask may be
    anything, -100 included. The logits under the mask are zeroed before the log-softmax
    (one more (B, T, V) pass), so a NaN or inf there reaches neither the value nor the gradient.
    """
    logits = _tensor(logits, "logits")
    if logits.ndim != 3:
        raise ValueError(f"logits: expected shape (B, T, V), got {logits.shape}")
    ids = _array(targets, logits)
    if tuple(ids.shape) != logits.shape[:-1]:
        raise ValueError(f"targets: expected shape {logits.shape[:-1]} (logits' (B, T)), got {tuple(ids.shape)}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"targets: expected integer token ids, got dtype {ids.dtype}")
    keep = _mask(mask, logits, shape=logits.shape[:-1]) > 0
    logits = F.where(keep[..., None], logits, 0.0)
    logp = F.token_logprobs(logits, logits.xp.where(keep, ids, 0))
    return F.where(keep, logp, 0.0)


def sequence_logprobs(logits, targets, mask):
    """log π(y|x) = Σ_t mask_t · log π(y_t | x, y_<t), one value per row.

    Arguments as in masked_token_logprobs. Returns (B,).
    """
    return masked_token_logprobs(logits, targets, mask).sum(axis=-1)


def masked_mean(x, mask, axis=None):
    """Σ mask·x / Σ mask over ``axis`` (all axes if None); a row with no mask-in entry gives 0, not NaN."""
    x = _tensor(x, "masked_mean")
    m = _mask(mask, x)
    xp = x.xp
    return _keep(x, m).sum(axis=axis) / xp.maximum(m.sum(axis=axis), 1.0)


def whiten(x, mask, eps=1e-8):
    """(x − μ) / (σ + eps) on masked-in entries, 0 elsewhere, with μ and σ over the masked-in
    entries only; σ is the unbiased (n − 1) standard deviation, as in TRL's ``masked_whiten``.

    The one whitening of the project: PPO's advantages (as OpenAI baselines' ppo2 and TRL
    normalise them) and REINFORCE++'s batch normalisation of returns (Hu 2025). x and mask of the same shape;
    eps >= 0. A constant x (or a single masked-in entry) gives exactly 0. Returns a detached Tensor.
    """
    _check_nonnegative(eps, "eps")
    x = _tensor(x, "x").detach()
    m = _mask(mask, x)
    xp = x.xp
    if x.data.size == 0:
        return Tensor(xp.zeros_like(x.data), dtype=x.dtype)
    keep = m > 0
    n = m.sum()
    mean = xp.where(keep, x.data, 0).sum() / xp.maximum(n, 1.0)
    centred = xp.where(keep, x.data - mean, 0)
    std = _unbiased_std(centred, n, axis=None)
    first = x.data.reshape(-1)[xp.argmax(keep.reshape(-1))]
    constant = xp.where(keep, x.data, first).min() == xp.where(keep, x.data, first).max()
    out = xp.where(keep & ~constant, centred / (std + eps), 0)
    return Tensor(out.astype(x.dtype, copy=False), dtype=x.dtype)


def sft_loss(logits, targets, mask, num_tokens=None):
    """Supervised fine-tuning: masked token cross-entropy, averaged over every response token.

    L = −Σ_{i,t} m_it log π(y_it | x_i, y_i,<t) / N   (InstructGPT, Ouyang et al. 2022, §3.5)

    with N = Σ_{i,t} m_it, or ``num_tokens`` when given: the token count of all the
    micro-batches of one accumulated step, so that summing their losses gives the loss of
    the whole batch (the gradient-accumulation fix of transformers, 2024).
    logits (B, T, V), targets (B, T) integer, mask (B, T) 1 on the tokens to imitate.
    """
    logp = masked_token_logprobs(logits, targets, mask)
    m = _mask(mask, logp)
    return -logp.sum() / _num_tokens(num_tokens, m)


# ---------------------------------------------------------- reward model
def bradley_terry_loss(r_chosen, r_rejected, margin=None):
    """Reward-model loss under the Bradley-Terry model (Ouyang et al. 2022, eq. 1; Llama 2 adds the margin):

        L = mean_i −log σ(r_chosen_i − r_rejected_i − margin_i)

    r_chosen, r_rejected (B,): scalar rewards of the preferred and the dispreferred
    response of each pair; margin: None, a number, or (B,) (how much better the chosen
    one was rated). Returns (loss, accuracy): accuracy is the share of pairs with
    r_chosen > r_rejected, a 0-d array.
    """
    r_chosen = _tensor(r_chosen, "r_chosen")
    r_rejected = _tensor(r_rejected, "r_rejected")
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_rejected: shape {r_rejected.shape} does not match r_chosen's {r_chosen.shape}")
    z = r_chosen - r_rejected
    if margin is not None:
        margin = _const(margin, z, "margin")
        if margin.shape not in ((), z.shape):
            raise ValueError(f"margin: expected a number or shape {z.shape}, got shape {margin.shape}")
        z = z - margin
    loss = _row_mean(-F.log_sigmoid(z))
    accuracy = _row_mean((r_chosen.data > r_rejected.data).astype(z.dtype))
    return loss, accuracy


# ------------------------------------------------------------------- KL
def kl_exact(logits, ref_logits, mask=None):
    """Exact per-token KL(π ‖ π_ref) = Σ_v π(v) (log π(v) − log π_ref(v)), shape (B, T).

    logits, ref_logits (B, T, V) of the policy and of the (detached) reference at the
    same positions. Masked positions give 0. Both log-softmaxes subtract the max first.
    """
    ref_logits = _const(ref_logits, logits, "ref_logits", logits.shape)
    if mask is not None:
        keep = _mask(mask, logits, shape=logits.shape[:-1]) > 0
        logits = F.where(keep[..., None], logits, 0.0)
        ref_logits = F.where(keep[..., None], ref_logits, 0.0)
    logp = F.log_softmax(logits, axis=-1)
    ref_logp = F.log_softmax(ref_logits, axis=-1)
    # a banned token (logit −inf) has π(v) = 0 and adds 0, not 0·(−inf)
    banned = logp.data == -math.inf
    log_ratio = F.where(banned, 0.0, logp) - F.where(banned, 0.0, ref_logp)
    return (logp.exp() * log_ratio).sum(axis=-1)


KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+")


def kl_estimate(logp, ref_logp, estimator="k1"):
    """Per-token Monte-Carlo estimators of KL(π ‖ π_ref) from samples y_t ~ π (Schulman 2020,
    "Approximating KL divergence"), with log r = log π(y_t) − log π_ref(y_t):

        k1 = log r                     unbiased, can be negative
        k2 = ½ (log r)²                biased, low variance, >= 0
        k3 = 1/r − 1 − log(1/r)        unbiased, >= 0, low variance (GRPO's KL term)
        abs = |log r|                  verl's "abs": biased, >= 0
        k1+, k3+                       the value of k1 (k3) with the gradient of k2 (verl's
                                       straight-through "k1+", "k3+"): k2 − sg(k2) + sg(k)

    As a loss term (differentiated through log π at the sampled y, the sample held fixed),
    E_{y~π}[∇k1] = 0, E[∇k2] = ∇KL(π ‖ π_ref) and E[∇k3] = ∇KL(π_ref ‖ π), the reverse
    direction; k1+ and k3+ carry k2's gradient, so they give ∇KL(π ‖ π_ref) while their values
    stay unbiased estimates of KL(π ‖ π_ref) (tests/test_losses_menu.py checks all five by
    enumeration on a one-token language, where a token is a whole response).

    k3 is evaluated as expm1(x) − x with x = log(π_ref/π) clipped to at most
    MAX_LOG_RATIO (so exp never overflows; beyond it the value is capped and the
    gradient is 0). logp carries the gradient; ref_logp is detached.
    """
    _check_option(estimator, KL_ESTIMATORS, "estimator")
    logp = _tensor(logp, "logp")
    ref_logp = _const(ref_logp, logp, "ref_logp", logp.shape)
    log_ratio = logp - ref_logp
    k2 = 0.5 * log_ratio * log_ratio
    if estimator == "k2":
        return k2
    if estimator == "abs":
        return F.abs(log_ratio)
    if estimator.startswith("k1"):
        k = log_ratio
    else:
        k = F.k3(F.clip(-log_ratio, None, MAX_LOG_RATIO))
    if estimator.endswith("+"):
        return k2 - k2.detach() + k.detach()
    return k


def response_kl(logp, ref_logp, mask, estimator="k1"):
    """The KL of each response: Σ_t m_t · k(y_t), k the per-token estimator of kl_estimate
    (one of KL_ESTIMATORS), so that E_{y~π}[response_kl] = KL(π(·|x) ‖ π_ref(·|x)) for k1 and k3.

    logp (B, T) with or without gradient (it flows through, as in kl_estimate); ref_logp (B, T)
    detached; mask (B, T). What sits under the mask is never read. Returns (B,).
    """
    logp = _per_token(logp, "logp")
    m = _mask(mask, logp)
    ref_logp = _const(ref_logp, logp, "ref_logp", logp.shape)
    return _keep(kl_estimate(_keep(logp, m), _keep(ref_logp, m), estimator), m).sum(axis=1)


def kl_penalty(logp, ref_logp, mask, scores, beta, estimator="k1"):
    """KL-shaped per-token rewards (Ziegler et al. 2019, eq. 2; InstructGPT, Ouyang et al. 2022, eq. 2):

        r_t = −β · k(y_t) + [t is the row's last response token] · score

    logp, ref_logp (B, T) of the sampled tokens under the rollout policy and the
    reference; mask (B, T); scores (B,) from the reward model; beta >= 0 the KL
    coefficient; estimator one of KL_ESTIMATORS (see kl_estimate). Everything is
    detached: these are rewards for GAE, not a loss. Returns (B, T), 0 under the mask.
    """
    _check_nonnegative(beta, "beta")
    logp = _per_token(logp, "logp").detach()
    m = _mask(mask, logp)
    scores = _const(scores, logp, "scores", (logp.shape[0],))
    k = kl_estimate(_keep(logp, m), _keep(_const(ref_logp, logp, "ref_logp", logp.shape), m), estimator)
    xp = logp.xp
    if logp.shape[1] == 0:
        return Tensor(xp.zeros(logp.shape, dtype=logp.dtype), dtype=logp.dtype)
    t = xp.arange(logp.shape[1])
    last = (m * t).max(axis=1)
    at_last = ((t[None, :] == last[:, None]) & (m.sum(axis=1) > 0)[:, None]).astype(logp.dtype)
    return Tensor(-beta * k.data * m + scores.data[:, None] * at_last, dtype=logp.dtype)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, §2.2):

        e = clip(KL / target − 1, −0.2, 0.2),    β ← β · (1 + e · n_steps / horizon)

    so β grows when the measured KL is above ``target`` and shrinks when below.
    init_beta > 0 the starting coefficient; target > 0 the KL (nats per sequence, or
    whatever unit the caller measures in); horizon > 0 in samples.
    """

    def __init__(self, init_beta, target, horizon):
        _check_positive(init_beta, "init_beta")
        _check_positive(target, "target")
        _check_positive(horizon, "horizon")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, measured_kl, n_steps):
        """Move β toward keeping KL at target after ``n_steps`` samples; returns the new β."""
        _check_nonnegative(n_steps, "n_steps")
        measured_kl = float(measured_kl)
        _check_finite(measured_kl, "measured_kl")  # one NaN would make β NaN for every later step
        error = min(max(measured_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


# ------------------------------------------------------------ REINFORCE
def rloo_advantages(rewards, group_size=None, index=None):
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024):

        A_i = r_i − 1/(G−1) Σ_{j≠i, j in i's group} r_j  =  G/(G−1) · (r_i − mean_group r)

    rewards (B,) with consecutive groups of ``group_size`` G >= 2 samples per prompt, or
    ``index`` (B,) group ids for groups of unequal sizes: G is then each row's own group size,
    and a group of one (nothing to leave out) gets 0. Returns detached (B,).
    """
    r = _tensor(rewards, "rewards").detach()
    if index is not None:
        centred, n = _group_centred(r, group_size, index)
        return Tensor(centred * n / r.xp.maximum(n - 1, 1), dtype=r.dtype)
    g = _groups(r, group_size)
    G = g.shape[1]
    baseline = (g.sum(axis=1, keepdims=True) - g) / (G - 1)
    return (g - baseline).reshape(r.shape[0])


def reinforce_loss(logp, rewards, mask, baseline=None, group_size=None):
    """REINFORCE (Williams 1992), sequence level:

        L = −mean_i (R_i − b_i) · Σ_t m_it log π(y_it | x_i, y_i,<t)

    so −∇L is an unbiased estimate of ∇ E_π[R] for any b_i that does not depend on y_i.
    logp (B, T) with gradient; rewards (B,) sequence returns R (detached); mask (B, T).
    baseline: None (b = 0); "mean" (b = mean of R over the group, or the batch if
    group_size is None — it includes R_i itself, so the gradient is scaled by (G−1)/G);
    "rloo" (b_i = mean of the other G−1 rewards of the group: unbiased, see rloo_advantages).
    group_size: samples per prompt (consecutive rows); None means the whole batch is one group.
    """
    _check_option(baseline, (None, "mean", "rloo"), "baseline")
    logp = _per_token(logp, "logp")
    m = _mask(mask, logp)
    R = _const(rewards, logp, "rewards", (logp.shape[0],))
    if baseline == "mean":
        g = _groups(R, group_size)
        advantages = (g - g.mean(axis=1, keepdims=True)).reshape(R.shape[0])
    elif baseline == "rloo":
        advantages = rloo_advantages(R, group_size)
    else:
        advantages = R
    return -_row_mean(advantages * _keep(logp, m).sum(axis=1))


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), over response tokens:

        δ_t = r_t + γ V_{t+1} − V_t,     A_t = δ_t + γλ A_{t+1},     returns_t = A_t + V_t

    rewards, values (B, T) per token (arrays or Tensors; used without gradient); mask
    (B, T). "t+1" is the row's next response token; after the last one V = 0 and A = 0
    (the episode ends). λ = 1 gives A_t = Σ_{s>=t} γ^{s−t} r_s − V_t (Monte-Carlo);
    λ = 0 gives the one-step TD error δ_t. Returns (advantages, returns), detached (B, T),
    0 under the mask.
    """
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma: must lie in [0, 1], got {gamma}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lam: must lie in [0, 1], got {lam}")
    values = _per_token(values, "values").detach()
    m = _mask(mask, values)
    r = _keep(_const(rewards, values, "rewards", values.shape), m).data
    v = _keep(values, m).data
    xp = values.xp
    B, T = v.shape
    advantages = xp.zeros_like(v)
    next_value = xp.zeros(B, dtype=v.dtype)
    next_adv = xp.zeros(B, dtype=v.dtype)
    for t in range(T - 1, -1, -1):
        on = m[:, t] > 0
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = xp.where(on, delta + gamma * lam * next_adv, 0)
        advantages[:, t] = adv
        next_value = xp.where(on, v[:, t], next_value)
        next_adv = xp.where(on, adv, next_adv)
    returns = (advantages + v) * m
    return Tensor(advantages, dtype=v.dtype), Tensor(returns, dtype=v.dtype)


def reinforce_pp_advantages(scores, logp, ref_logp, mask, beta=0.01, gamma=1.0, eps=1e-8):
    """REINFORCE++ advantages (Hu 2025): token returns of the KL-shaped reward,
    whitened over every response token of the batch (no critic, no per-prompt groups):

        r_t = −β log(π(y_t)/π_ref(y_t)) + [t last] · score,   G_t = Σ_{s>=t} γ^{s−t} r_s,
        A_t = (G_t − mean(G)) / (std(G) + eps)

    scores (B,) from the reward model; logp, ref_logp (B, T) of the sampled tokens under
    the rollout policy and the reference; mask (B, T). mean and std (unbiased) run over the
    masked-in tokens of the whole batch (see whiten). Returns detached (B, T), 0 under the mask.
    """
    rewards = kl_penalty(logp, ref_logp, mask, scores, beta, estimator="k1")
    returns, _ = gae(rewards, Tensor(rewards.xp.zeros_like(rewards.data), dtype=rewards.dtype), mask,
                     gamma=gamma, lam=1.0)
    return whiten(returns, mask, eps)


# ------------------------------------------------------------------ PPO
def _clipped_surrogate(ratio, advantages, low, high):
    """Per-token −min(ratio·A, clip(ratio, 1−low, 1+high)·A) and where the clipped branch won."""
    unclipped = -advantages * ratio
    clipped = -advantages * F.clip(ratio, 1.0 - low, 1.0 + high)
    return F.maximum(unclipped, clipped), clipped.data > unclipped.data


def _clip_sides(clipped, A, m):
    """The clipped share split by side: clip_low (ρ < 1 − ε with A < 0), clip_high (ρ > 1 + ε_high with A > 0)."""
    return {"clip_low": _fraction(clipped & (A.data < 0), m), "clip_high": _fraction(clipped & (A.data > 0), m)}


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, clip_eps_high=None, dual_clip=None):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss averaged over response tokens:

        ρ_t = π(y_t)/π_old(y_t),   ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1−ε_low, 1+ε_high) A_t)

    With ``clip_eps_high`` the upper clip differs from the lower (DAPO's clip-higher, Yu et
    al. 2025); with ``dual_clip`` = c > 1, tokens with A_t < 0 are further bounded by
    ℓ_t <= −c·A_t (dual-clip PPO, Ye et al. 2020), so a huge ratio on a bad token
    cannot blow up the loss.

    logp (B, T) with gradient; old_logp (B, T) from the rollout policy; advantages (B, T)
    or (B,); mask (B, T). log ρ is clipped to ±MAX_LOG_RATIO before exp.
    Returns (loss, stats): stats["clip_fraction"] is the share of tokens where the clipped
    branch is active (clip_low and clip_high split it by side), stats["approx_kl"] the k3 estimate of KL(π_old ‖ π) = mean(ρ − 1 − log ρ).
    """
    eps_high = _check_clip(clip_eps, clip_eps_high)
    if dual_clip is not None and not 1 < dual_clip < math.inf:
        raise ValueError(f"dual_clip: must be > 1 (the lower bound c on −A·ratio), got {dual_clip}")
    logp = _per_token(logp, "logp")
    m = _mask(mask, logp)
    old_logp = _const(old_logp, logp, "old_logp", logp.shape)
    A = _keep(_per_sequence(advantages, logp, "advantages"), m)
    log_ratio = _safe_log_ratio(_keep(logp, m), _keep(old_logp, m))
    ratio = log_ratio.exp()
    per_token, clipped = _clipped_surrogate(ratio, A, clip_eps, eps_high)
    if dual_clip is not None:
        per_token = F.where(A.data < 0, F.minimum(per_token, -dual_clip * A), per_token)
    xp = logp.xp
    loss = masked_mean(per_token, m)
    stats = {"clip_fraction": _fraction(clipped, m), **_clip_sides(clipped, A, m),
             "approx_kl": _fraction(xp.expm1(log_ratio.data) - log_ratio.data, m)}
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2):
    """PPO's clipped value loss (Schulman et al. 2017, as in OpenAI baselines' ppo2), token mean:

        V_clip = V_old + clip(V − V_old, −ε, ε),    L = ½ mean_t max((V − R)², (V_clip − R)²)

    values (B, T) from the value head with gradient; old_values (B, T) at rollout time;
    returns (B, T) targets R (from gae); mask (B, T); clip_eps > 0 in units of value.
    """
    _check_positive(clip_eps, "clip_eps")
    values = _per_token(values, "values")
    m = _mask(mask, values)
    old = _keep(_const(old_values, values, "old_values", values.shape), m)
    R = _keep(_const(returns, values, "returns", values.shape), m)
    V = _keep(values, m)
    V_clip = old + F.clip(V - old, -clip_eps, clip_eps)
    per_token = F.maximum((V - R) ** 2, (V_clip - R) ** 2)
    return 0.5 * masked_mean(per_token, m)


def entropy(logits, mask):
    """Mean entropy of the next-token distributions over response tokens (the PPO bonus,
    Schulman et al. 2017, eq. 9): H_t = −Σ_v π(v) log π(v), averaged where mask is 1.

    logits (B, T, V); mask (B, T). The loss subtracts c · entropy to encourage exploration.
    """
    keep = _mask(mask, logits, shape=logits.shape[:-1])
    logits = F.where(keep[..., None] > 0, logits, 0.0)
    logp = F.log_softmax(logits, axis=-1)
    H = -(logp.exp() * F.where(logp.data == -math.inf, 0.0, logp)).sum(axis=-1)  # a banned token adds 0
    return masked_mean(H, keep)


# ----------------------------------------------------------------- GRPO
def grpo_advantages(rewards, group_size=None, scale="group", eps=1e-4, index=None):
    """Group-relative advantages (GRPO, Shao et al. 2024, DeepSeekMath §4.1.2):

        A_i = (r_i − mean_group r) / (std + eps)

    rewards (B,), consecutive groups of group_size G >= 2. scale: "group" — std is the
    unbiased sample std of i's group; "batch" — the unbiased std of all B rewards
    (Hu 2025; TRL's scale_rewards="batch"); "none" — no division (Dr. GRPO, Liu et al.
    2025). A group whose rewards are all equal gets exactly 0. Instead of group_size, ``index``
    (B,) gives each row's group id, for groups of unequal sizes; a group of one has nothing to
    compare with and gets 0 (verl keeps its raw score instead). With neither, the whole batch is one
    group. Returns detached (B,).
    """
    _check_option(scale, ("group", "batch", "none"), "scale")
    _check_nonnegative(eps, "eps")
    r = _tensor(rewards, "rewards").detach()
    xp = r.xp
    _check_finite_rewards(r)
    if index is not None:
        centred, n = _group_centred(r, group_size, index)
        if scale == "group":
            std = _group_unbiased_std(centred, n, *_group_index(r, None, index)[1:])
        elif scale == "batch":
            std = _unbiased_std(r.data - r.data.mean(), r.shape[0], axis=None)
        if scale != "none":
            centred = centred / xp.where(std + eps > 0, std + eps, 1)
        return Tensor(centred.astype(r.dtype, copy=False), dtype=r.dtype)
    g = _groups(r, group_size).data
    constant = g.max(axis=1, keepdims=True) == g.min(axis=1, keepdims=True)
    centered = xp.where(constant, 0, g - g.mean(axis=1, keepdims=True))
    if scale != "none":
        if scale == "group":
            std = _unbiased_std(centered, g.shape[1], axis=1)
        else:
            std = _unbiased_std(r.data - r.data.mean(), r.shape[0], axis=None)
        # a constant group is already exactly 0; dividing it by std + eps = 0 would make NaN
        centered = centered / xp.where(std + eps > 0, std + eps, 1)
    return Tensor(centered.reshape(r.shape[0]), dtype=r.dtype)


def _check_finite_rewards(r):
    xp = r.xp
    bad = ~xp.isfinite(r.data)
    if bad.any():  # one host sync on the GPU: a NaN reward would silently zero or skew its group
        raise ValueError(f"rewards: must be finite, got {r.data[bad][:3].tolist()} at rows "
                         f"{xp.flatnonzero(bad)[:3].tolist()}")


def _group_sum(x, inverse, counts):
    """Σ of x over each row's group, given back per row (B,)."""
    xp = backend.get_array_module(x)
    return xp.bincount(inverse, weights=x, minlength=counts.shape[0])[inverse].astype(x.dtype, copy=False)


def _group_centred(r, group_size, index):
    """(r_i − mean of i's group, size of i's group) as arrays (B,); exactly 0 for every row of a
    group whose rewards are all equal, a group of one included."""
    first, inverse, counts = _group_index(r, group_size, index)
    x = r.data
    n = counts[inverse].astype(x.dtype)
    differs = _group_sum((x != x[first][inverse]).astype(x.dtype), inverse, counts) > 0
    return r.xp.where(differs, x - _group_sum(x, inverse, counts) / n, 0), n


def _group_unbiased_std(centred, n, inverse, counts):
    """sqrt(Σ_group c² / (n − 1)) per row, scaled by max |c| first so that no square overflows."""
    xp = backend.get_array_module(centred)
    s = xp.abs(centred).max() if centred.size else xp.zeros((), centred.dtype)
    u = centred / xp.where(s > 0, s, 1)
    return s * xp.sqrt(_group_sum(u * u, inverse, counts) / xp.maximum(n - 1, 1))


def _aggregate(per_token, m, loss_type, num_tokens=None):
    masked = _keep(per_token, m)
    if loss_type == "grpo":
        return _row_mean(masked_mean(per_token, m, axis=1))
    if loss_type == "dr_grpo":
        return masked.sum() / max(m.shape[0] * m.shape[1], 1)
    return masked.sum() / _num_tokens(num_tokens, m)


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.04, clip_eps=0.2, clip_eps_high=None,
              loss_type="grpo", num_tokens=None):
    """GRPO (Shao et al. 2024, DeepSeekMath eq. 3), per token:

        ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1−ε_low, 1+ε_high) A_i) + β · k3_t,
        ρ_t = π(y_t)/π_old(y_t),   k3_t = π_ref/π − 1 − log(π_ref/π)   (eq. 4)

    then aggregated by loss_type:
      "grpo"    mean_i (Σ_t m ℓ / Σ_t m)          token mean per sequence, then mean (the paper)
      "bnpo"    Σ m ℓ / N                         token mean over the batch, N = Σ m
      "dr_grpo" Σ m ℓ / (B · T)                   a constant normaliser (Dr. GRPO, Liu et al. 2025);
                                                   pad to a fixed T to keep it constant across steps
      "dapo"    Σ m ℓ / N                         DAPO's token-level loss (Yu et al. 2025); the same
                                                   formula as "bnpo", named as the paper names it

    For "bnpo" and "dapo", ``num_tokens`` replaces N by the token count of every micro-batch of
    an accumulated step, so that the micro-batch losses sum to the loss of the whole batch.

    logp (B, T) with gradient; old_logp (B, T) from the rollout policy; ref_logp (B, T)
    from the reference (may be None when beta == 0); advantages (B,) (or (B, T)) from
    grpo_advantages; mask (B, T); beta >= 0; clip_eps in (0, 1); clip_eps_high (DAPO's
    clip-higher) defaults to clip_eps. Returns (loss, stats) with clip_fraction and kl
    (the token mean of k3).
    """
    _check_option(loss_type, GRPO_LOSS_TYPES, "loss_type")
    if num_tokens is not None and loss_type not in ("bnpo", "dapo"):
        raise ValueError(f"num_tokens: only the token-mean loss types 'bnpo' and 'dapo' use it; got loss_type "
                         f"{loss_type!r}")
    _check_nonnegative(beta, "beta")
    eps_high = _check_clip(clip_eps, clip_eps_high)
    logp = _per_token(logp, "logp")
    m = _mask(mask, logp)
    old_logp = _keep(_const(old_logp, logp, "old_logp", logp.shape), m)
    A = _keep(_per_sequence(advantages, logp, "advantages"), m)
    logp = _keep(logp, m)
    ratio = _safe_log_ratio(logp, old_logp).exp()
    per_token, clipped = _clipped_surrogate(ratio, A, clip_eps, eps_high)
    stats = {"clip_fraction": _fraction(clipped, m), **_clip_sides(clipped, A, m)}
    k3 = _reference_k3(logp, ref_logp, m, beta, stats)
    if k3 is not None and beta != 0:
        per_token = per_token + beta * k3
    return _aggregate(per_token, m, loss_type, num_tokens), stats


def _reference_k3(logp, ref_logp, m, beta, stats):
    """Per-token k3 to the reference, its masked mean recorded as stats["kl"]; None without a reference."""
    if ref_logp is None:
        if beta != 0:
            raise ValueError(f"ref_logp: needed when beta != 0 (got beta={beta})")
        return None
    k3 = kl_estimate(logp, _keep(_const(ref_logp, logp, "ref_logp", logp.shape), m), "k3")
    stats["kl"] = _fraction(k3.data, m)
    return k3


def gspo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.0, clip_eps=3e-4, clip_eps_high=4e-4):
    """GSPO (Zheng et al. 2025, Group Sequence Policy Optimization): GRPO with one ratio per sequence,

        s_i = (π(y_i)/π_old(y_i))^{1/|y_i|} = exp( (1/|y_i|) Σ_t m_t log(π(y_t)/π_old(y_t)) ),
        L = mean_i −min(s_i A_i, clip(s_i, 1−ε_low, 1+ε_high) A_i)  [+ β · mean_i token-mean k3]

    the geometric mean of the token ratios, clipped as a whole (the paper's ε are ~3e-4 and
    4e-4 because s_i is length-normalised). Arguments as in grpo_loss, with advantages (B,);
    beta defaults to 0 (the paper uses no KL term). A response with no tokens adds 0. Returns
    (loss, stats) with clip_fraction (share of non-empty sequences clipped) and kl.
    """
    _check_nonnegative(beta, "beta")
    eps_high = _check_clip(clip_eps, clip_eps_high)
    logp = _per_token(logp, "logp")
    m = _mask(mask, logp)
    xp = logp.xp
    A = _const(advantages, logp, "advantages", (logp.shape[0],))
    lengths = xp.maximum(m.sum(axis=1), 1.0)
    logp = _keep(logp, m)
    old_logp = _keep(_const(old_logp, logp, "old_logp", logp.shape), m)
    seq_log_ratio = (logp - old_logp).sum(axis=1) / lengths
    s = F.clip(seq_log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    per_seq, clipped = _clipped_surrogate(s, A, clip_eps, eps_high)
    # a response with no tokens has no ratio: it adds 0 (not −A_i/B) and is not counted as clipped
    nonempty = (m.sum(axis=1) > 0).astype(logp.dtype)
    loss = _row_mean(_keep(per_seq, nonempty))
    stats = {"clip_fraction": _fraction(clipped, nonempty)}
    k3 = _reference_k3(logp, ref_logp, m, beta, stats)
    if k3 is not None and beta != 0:
        loss = loss + beta * _aggregate(k3, m, "grpo")
    return loss, stats


# ------------------------------------------------------ preference (DPO)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "cdpo")
DPO_LENGTH_LOSS_TYPES = ("ipo_norm",)   # these also need the response lengths len_chosen, len_rejected
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0, rpo_alpha=0.0, len_chosen=None, len_rejected=None, f_divergence="reverse_kl",
             alpha=0.5):
    """Direct preference optimisation on sequence log-probs. With
    h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l) and z = β·h:

      "sigmoid"  −log σ(z)                                 DPO, Rafailov et al. 2023, eq. 7
      "cdpo"     −(1−ε) log σ(z) − ε log σ(−z)             conservative DPO (Mitchell 2023): the sigmoid
                                                           loss averaged over label flips with rate ε
      "robust"   (−(1−ε) log σ(z) + ε log σ(−z)) / (1−2ε)  robust DPO (Chowdhury et al. 2024): averaged
                                                           over flips with rate ε it is the clean loss
      "hinge"    max(0, 1 − z)                             SLiC's hinge (Zhao et al. 2023)
      "ipo"      (h − 1/(2β))²                             IPO, Azar et al. 2023, eq. 17: h on whole
                                                           sequences, as the paper defines it
      "ipo_norm" (h̄ − 1/(2β))²                             IPO as TRL implements it: h̄ on length-averaged
                                                           log-ratios, log π/π_ref(y)/|y| (len_* needed)

    Options:
      rpo_alpha α > 0 adds α · mean_i −log π(y_w,i)/|y_w,i|, the length-normalised NLL of the
        chosen response (RPO, Pang et al. 2024, eq. 2; len_chosen needed). TRL divides the NLL by
        the batch's token count instead; we follow the paper (each response's token mean).
      f_divergence (Wang et al. 2023, "Beyond Reverse KL", Theorem 1): DPO for the f-divergence
        whose f′ replaces log in the logit, with u = log π/π_ref of each response:
          "reverse_kl"        z = β (u_w − u_l)                          (DPO)
          "forward_kl"        z = β (e^{−u_l} − e^{−u_w})                f′(x) = −1/x
          "js_divergence"     z = β ((u_w − softplus u_w) − (u_l − softplus u_l))   f′(x) = log(2x/(1+x))
          "alpha_divergence"  z = β (e^{−α u_l} − e^{−α u_w}) / α        f′(x) = (1 − x^{−α})/α, α in (0, 1);
                                                                     α → 0 gives reverse KL, α = 1 forward KL
        for the logistic and hinge losses ("sigmoid", "cdpo", "robust", "hinge"); the exponents are
        capped at MAX_LOG_RATIO, as TRL caps them.

    pi_chosen, pi_rejected (B,): log π(y_w|x), log π(y_l|x) under the policy (with gradient);
    ref_chosen, ref_rejected (B,): the same under the frozen reference; beta > 0;
    label_smoothing ε in [0, 0.5) for "cdpo" and "robust" (must be 0 otherwise);
    len_chosen, len_rejected (B,) response lengths in tokens (>= 1).
    Returns (loss, chosen_rewards, rejected_rewards): the batch-mean loss and the detached
    implicit rewards β log(π/π_ref) of each response, (B,).
    """
    _check_option(loss_type, DPO_LOSS_TYPES + DPO_LENGTH_LOSS_TYPES, "loss_type")
    _check_positive(beta, "beta")
    if loss_type in ("cdpo", "robust"):
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must lie in [0, 0.5) for loss_type {loss_type!r}, "
                             f"got {label_smoothing}")
    elif label_smoothing != 0:
        raise ValueError(f"label_smoothing: only loss_type 'cdpo' or 'robust' use it; got {label_smoothing} "
                         f"with loss_type {loss_type!r}")
    _check_nonnegative(rpo_alpha, "rpo_alpha")
    _check_option(f_divergence, F_DIVERGENCES, "f_divergence")
    if f_divergence != "reverse_kl" and loss_type in ("ipo", "ipo_norm"):
        raise ValueError(f"f_divergence: {f_divergence!r} applies to the logistic and hinge losses, not to "
                         f"loss_type {loss_type!r}")
    if f_divergence == "alpha_divergence" and not (_is_real(alpha) and 0 < alpha < 1):
        raise ValueError(f"alpha: must lie in (0, 1) for the alpha divergence, got {alpha!r}")
    pi_chosen = _tensor(pi_chosen, "pi_chosen")
    shape = pi_chosen.shape
    pi_rejected = _tensor(pi_rejected, "pi_rejected")
    if pi_rejected.shape != shape:
        raise ValueError(f"pi_rejected: shape {pi_rejected.shape} does not match pi_chosen's {shape}")
    need_lengths = loss_type == "ipo_norm" or rpo_alpha != 0
    if need_lengths and len_chosen is None:
        raise ValueError(f"len_chosen: needed for loss_type 'ipo_norm' and for rpo_alpha > 0 (got loss_type "
                         f"{loss_type!r}, rpo_alpha={rpo_alpha})")
    if loss_type == "ipo_norm" and len_rejected is None:
        raise ValueError("len_rejected: needed for loss_type 'ipo_norm'")
    chosen_log_ratio = pi_chosen - _const(ref_chosen, pi_chosen, "ref_chosen", shape)
    rejected_log_ratio = pi_rejected - _const(ref_rejected, pi_chosen, "ref_rejected", shape)
    h = chosen_log_ratio - rejected_log_ratio
    z = beta * _f_divergence_logit(chosen_log_ratio, rejected_log_ratio, f_divergence, alpha)
    eps = label_smoothing
    if loss_type == "sigmoid":
        per_pair = -F.log_sigmoid(z)
    elif loss_type == "cdpo":
        per_pair = -(1 - eps) * F.log_sigmoid(z) - eps * F.log_sigmoid(-z)
    elif loss_type == "robust":
        per_pair = (-(1 - eps) * F.log_sigmoid(z) + eps * F.log_sigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        per_pair = F.relu(1 - z)
    elif loss_type == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    else:
        h_mean = (chosen_log_ratio / _lengths(len_chosen, pi_chosen, "len_chosen")
                  - rejected_log_ratio / _lengths(len_rejected, pi_chosen, "len_rejected"))
        per_pair = (h_mean - 1 / (2 * beta)) ** 2
    loss = _row_mean(per_pair)
    if rpo_alpha != 0:
        loss = loss + rpo_alpha * _row_mean(-pi_chosen / _lengths(len_chosen, pi_chosen, "len_chosen"))
    return loss, beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach()


def _lengths(lengths, like, name):
    n = _const(lengths, like, name, like.shape)
    if (n.data < 1).any():
        raise ValueError(f"{name}: response lengths must be >= 1 token, got {n.data[n.data < 1][:3].tolist()}")
    return n


def _f_divergence_logit(u_w, u_l, f_divergence, alpha):
    """f′(π/π_ref)(y_w) − f′(π/π_ref)(y_l) (up to the constant f′ adds to both), from the log-ratios u."""
    if f_divergence == "reverse_kl":
        return u_w - u_l

    def capped_exp(x):
        return F.clip(x, None, MAX_LOG_RATIO).exp()

    if f_divergence == "forward_kl":
        return capped_exp(-u_l) - capped_exp(-u_w)
    if f_divergence == "alpha_divergence":
        return (capped_exp(-alpha * u_l) - capped_exp(-alpha * u_w)) / alpha
    return (u_w - F.softplus(u_w)) - (u_l - F.softplus(u_l))


def simpo_loss(pi_chosen, pi_rejected, len_chosen, len_rejected, beta=2.0, gamma=1.0):
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-averaged, with a target margin γ:

        L = mean −log σ( β/|y_w| · log π(y_w) − β/|y_l| · log π(y_l) − γ )

    pi_chosen, pi_rejected (B,) sequence log-probs with gradient; len_chosen, len_rejected
    (B,) response lengths in tokens (>= 1); beta > 0; gamma the margin. Returns
    (loss, chosen_rewards, rejected_rewards) with the detached rewards β/|y| · log π(y).
    """
    _check_positive(beta, "beta")
    _check_finite(gamma, "gamma")
    pi_chosen = _tensor(pi_chosen, "pi_chosen")
    pi_rejected = _tensor(pi_rejected, "pi_rejected")
    shape = pi_chosen.shape
    len_w = _const(len_chosen, pi_chosen, "len_chosen", shape)
    len_l = _const(len_rejected, pi_chosen, "len_rejected", shape)
    chosen = beta * pi_chosen / F.maximum(len_w, 1.0)
    rejected = beta * pi_rejected / F.maximum(len_l, 1.0)
    loss = _row_mean(-F.log_sigmoid(chosen - rejected - gamma))
    return loss, chosen.detach(), rejected.detach()


def orpo_loss(logp_chosen, logp_rejected, mask_chosen, mask_rejected, lam=0.1):
    """ORPO (Hong et al. 2024, eqs. 6–7): SFT on the chosen response plus an odds-ratio penalty,

        P(y) = exp( (1/|y|) Σ_t log π(y_t) ),   log odds(y) = log P(y) − log(1 − P(y)),
        L = NLL(y_w) + λ · mean −log σ( log odds(y_w) − log odds(y_l) )

    with NLL the token-mean cross-entropy of the chosen responses. log(1 − P) is computed
    by a stable log1mexp; the mean log-prob is capped just below 0 (−finfo.eps) so P = 1
    gives a large finite value, not inf. logp_chosen, logp_rejected (B, T) per-token
    log-probs with gradient; mask_chosen, mask_rejected (B, T); lam >= 0.
    Returns (loss, stats) with nll, odds_ratio_loss and log_odds_ratio (0-d arrays).
    """
    _check_nonnegative(lam, "lam")
    logp_chosen = _per_token(logp_chosen, "logp_chosen")
    logp_rejected = _per_token(logp_rejected, "logp_rejected")
    if logp_rejected.shape[0] != logp_chosen.shape[0]:
        raise ValueError(f"logp_rejected: batch size {logp_rejected.shape[0]} does not match logp_chosen's "
                         f"{logp_chosen.shape[0]}")
    m_w = _mask(mask_chosen, logp_chosen, "mask_chosen")
    m_l = _mask(mask_rejected, logp_rejected, "mask_rejected")
    below_zero = -float(np.finfo(logp_chosen.dtype).eps)

    def log_odds(logp, m):
        mean_logp = masked_mean(logp, m, axis=1)
        mean_logp = F.clip(mean_logp, None, below_zero)
        return mean_logp - F.log1mexp(mean_logp)

    log_odds_ratio = log_odds(logp_chosen, m_w) - log_odds(logp_rejected, m_l)
    odds_ratio_loss = _row_mean(-F.log_sigmoid(log_odds_ratio))
    nll = -masked_mean(logp_chosen, m_w)
    stats = {"nll": nll.data, "odds_ratio_loss": odds_ratio_loss.data, "log_odds_ratio": _row_mean(log_odds_ratio.data)}
    return nll + lam * odds_ratio_loss, stats


def kto_loss(pi_logp, ref_logp, desirable, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, §4): Kahneman-Tversky value on unpaired examples,

        r = log π(y|x)/π_ref(y|x),   z0 = max(0, KL anchor) (detached)
        v = λ_D σ(β(r − z0))  if y is desirable,   λ_U σ(β(z0 − r))  if undesirable
        L = mean (λ_y − v)

    pi_logp, ref_logp (B,) sequence log-probs under the policy (with gradient) and the
    reference; desirable (B,) booleans; z0 the reference point: an estimate of
    KL(π ‖ π_ref), e.g. mean(log π(y'|x) − log π_ref(y'|x)) over responses y' paired with
    mismatched prompts x — a number or a Tensor; it is clamped at 0 and detached, so no
    gradient flows through it. beta > 0; desirable_weight λ_D, undesirable_weight λ_U >= 0.
    Returns (loss, rewards) with the detached implicit rewards β·r, (B,).
    """
    _check_positive(beta, "beta")
    _check_nonnegative(desirable_weight, "desirable_weight")
    _check_nonnegative(undesirable_weight, "undesirable_weight")
    pi_logp = _tensor(pi_logp, "pi_logp")
    shape = pi_logp.shape
    log_ratio = pi_logp - _const(ref_logp, pi_logp, "ref_logp", shape)
    d = _array(desirable, pi_logp)
    if tuple(d.shape) != tuple(shape):
        raise ValueError(f"desirable: expected shape {tuple(shape)}, got {tuple(d.shape)}")
    d = d.astype(bool)
    z0 = F.maximum(_const(z0, pi_logp, "z0"), 0.0)
    value = F.where(d, desirable_weight * F.sigmoid(beta * (log_ratio - z0)),
                    undesirable_weight * F.sigmoid(beta * (z0 - log_ratio)))
    weight = pi_logp.xp.where(d, desirable_weight, undesirable_weight).astype(pi_logp.dtype)
    return _row_mean(weight - value), beta * log_ratio.detach()


def kto_reference_point(pi_logp_mismatched, ref_logp_mismatched):
    """KTO's reference point estimated from the batch as the paper does (Ethayarajh et al. 2024, §4.1):

        z0 = max(0, (1/m) Σ_j log π(y'_j | x_j) / π_ref(y'_j | x_j))

    over m mismatched pairs (x_j, y'_j): each prompt with the response of another example of the
    batch (TRL pairs example j with example j+1's response), a biased but cheap estimate of
    KL(π ‖ π_ref). pi_logp_mismatched, ref_logp_mismatched (m,) sequence log-probs of those pairs.
    Detached, so kto_loss sends no gradient through it (TRL and the paper alike). An empty batch
    gives 0. Returns a 0-d detached Tensor, to pass as kto_loss's z0.
    """
    pi = _tensor(pi_logp_mismatched, "pi_logp_mismatched").detach()
    if pi.ndim != 1:
        raise ValueError(f"pi_logp_mismatched: expected shape (m,), got {pi.shape}")
    log_ratio = pi - _const(ref_logp_mismatched, pi, "ref_logp_mismatched", pi.shape)
    return F.maximum(_row_mean(log_ratio), 0.0)


# ------------------------------------------------- advantage estimators (more)
def reinforce_pp_baseline_advantages(rewards, group_size=None, mask=None, eps=1e-8, index=None):
    """REINFORCE++-baseline (Hu et al. 2025, REINFORCE++, its group-baseline variant): subtract
    each prompt's mean reward, then whiten over the whole batch,

        A_i = whiten_batch( r_i − mean_{j in i's group} r_j )

    rewards (B,) in consecutive groups of group_size, or ``index`` (B,) group ids (groups of any
    size). With ``mask`` (B, T) the whitening runs over response tokens, as verl and OpenRLHF do
    (a response weighs by its length) and the result is (B, T), 0 under the mask; without it,
    over responses, (B,). Groups of one have nothing to compare with: they are left out of the
    whitening and get 0 (verl keeps their raw score). A batch of constant groups gives 0.
    Returns a detached Tensor.
    """
    _check_nonnegative(eps, "eps")
    r = _tensor(rewards, "rewards").detach()
    _check_finite_rewards(r)
    centred, n = _group_centred(r, group_size, index)
    comparable = (n > 1).astype(r.dtype)
    if mask is None:
        return whiten(Tensor(centred, dtype=r.dtype), comparable, eps)
    m = _array(mask, r)
    if m.ndim != 2 or m.shape[0] != r.shape[0]:
        raise ValueError(f"mask: expected shape ({r.shape[0]}, T) (rewards' B), got {tuple(m.shape)}")
    m = _mask(m, r, shape=m.shape)
    return whiten(Tensor(centred[:, None] * m, dtype=r.dtype), m * comparable[:, None], eps)


def remax_advantages(rewards, greedy_rewards):
    """ReMax (Li et al. 2023, Algorithm 1): REINFORCE whose baseline is the reward of the greedy
    response to the same prompt,

        A_i = r(x_i, y_i) − r(x_i, ȳ_i),   ȳ_i = argmax decoding of π(·|x_i)

    rewards, greedy_rewards (B,): each row's reward and the greedy reward of its prompt (repeated
    for rows of the same prompt). The baseline does not depend on y_i, so the gradient stays
    unbiased. Returns detached (B,).
    """
    r = _tensor(rewards, "rewards").detach()
    if r.ndim != 1:
        raise ValueError(f"rewards: expected shape (B,), got {r.shape}")
    _check_finite_rewards(r)
    b = _const(greedy_rewards, r, "greedy_rewards", r.shape)
    _check_finite_rewards(Tensor(b.data, dtype=r.dtype))
    return r - b


def pass_at_k_advantages(rewards, group_size, k, scale="group"):
    """GRPO's advantage for pass@k instead of pass@1 (Chen et al. 2025, "Pass@k Training", eqs. 14–15),
    for 0/1 rewards. A group of N samples with N_neg failures is scored by every k-subset's best
    reward, averaged:

        R̄ = 1 − C(N_neg, k) / C(N, k)                                    (the group's pass@k estimate)
        A_pos = 1 − R̄,    A_neg = 1 − R̄ − C(N_neg − 1, k − 1) / C(N − 1, k − 1),
        then / σ with σ = sqrt(R̄ (1 − R̄))   (scale "group"; "none": no division)

    A sample's unscaled A is the mean best reward of the k-subsets that hold it, minus R̄; its
    group mean is 0. Unscaled, E[(1/N) Σ_i A_i ∇log π(y_i)] = (N − k)/(N k) · ∇ pass@k(π) for
    pass@k = 1 − (1 − p)^k (tests/test_losses_menu.py checks it by enumeration on minirlhf/exact.py);
    k = 1 gives r_i − mean_group r, GRPO's advantage with the population σ (grpo_advantages uses
    the unbiased one). A group where fewer than k samples fail, or all fail, gets 0.

    rewards (B,) of 0s and 1s in consecutive groups of group_size N >= 2; k in [1, N].
    Returns detached (B,).
    """
    _check_option(scale, ("group", "none"), "scale")
    r = _tensor(rewards, "rewards").detach()
    g = _groups(r, group_size).data
    _check_int_range(k, 1, group_size, "k", "samples per pass@k attempt, at most group_size")
    xp = r.xp
    if not ((g == 0) | (g == 1)).all():
        raise ValueError(f"rewards: pass@k needs 0/1 rewards (failed/passed), got values "
                         f"{xp.unique(g[(g != 0) & (g != 1)])[:3].tolist()}")
    N = group_size
    n_neg = (1 - g).sum(axis=1, keepdims=True)
    q = xp.ones_like(n_neg)        # C(N_neg, k) / C(N, k): the chance that k samples all fail
    q_cond = xp.ones_like(n_neg)   # C(N_neg − 1, k − 1) / C(N − 1, k − 1): the same with one failure given
    for j in range(k):
        q = q * xp.maximum(n_neg - j, 0) / (N - j)
    for j in range(k - 1):
        q_cond = q_cond * xp.maximum(n_neg - 1 - j, 0) / (N - 1 - j)
    A = xp.where(g == 1, q, q - q_cond)
    if scale == "group":
        sigma = xp.sqrt(q * (1 - q))
        A = xp.where(sigma > 0, A / xp.where(sigma > 0, sigma, 1), 0)
    return Tensor(A.reshape(r.shape[0]).astype(r.dtype, copy=False), dtype=r.dtype)


# ------------------------------------------------------ policy objectives (more)
def _policy_inputs(logp, old_logp, advantages, mask):
    """(logp, old_logp, A, m) with the module's conventions: masked positions zeroed, old_logp and
    A detached, A broadcastable to (B, T)."""
    logp = _per_token(logp, "logp")
    m = _mask(mask, logp)
    old_logp = _keep(_const(old_logp, logp, "old_logp", logp.shape), m)
    A = _keep(_per_sequence(advantages, logp, "advantages"), m)
    return _keep(logp, m), old_logp, A, m


def _with_reference_kl(loss, logp, ref_logp, m, beta, stats, loss_type):
    k3 = _reference_k3(logp, ref_logp, m, beta, stats)
    if k3 is not None and beta != 0:
        loss = loss + beta * _aggregate(k3, m, loss_type)
    return loss


def cispo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.0, clip_eps=None, clip_eps_high=0.28,
               num_tokens=None):
    """CISPO (MiniMax-M1, 2025, eq. 4): REINFORCE weighted by the clipped, stopped-gradient
    importance ratio, so no token ever loses its gradient (PPO drops the clipped ones):

        ℓ_t = −sg(clip(ρ_t, 1 − ε_low, 1 + ε_high)) · A_i · log π(y_t),     L = Σ m ℓ / N

    N = Σ m (the paper's 1/Σ|o_i|), or ``num_tokens`` across micro-batches as in grpo_loss.
    clip_eps (ε_low) None leaves the ratio unbounded below, as the paper does (it tunes only
    ε_high); clip_eps_high > 0. At ρ = 1 the gradient equals PPO's. The loss value is not a
    surrogate of the return, only its gradient is meaningful. Other arguments as in grpo_loss
    (beta adds β · token-mean k3 to the reference). Returns (loss, stats) with weight_clip_fraction
    (share of tokens whose weight was clipped; not PPO's clip_fraction, no branch is dropped) and kl.
    """
    _check_nonnegative(beta, "beta")
    if clip_eps is not None:
        _check_clip(clip_eps, None)
    _check_positive(clip_eps_high, "clip_eps_high")
    logp, old_logp, A, m = _policy_inputs(logp, old_logp, advantages, mask)
    ratio = _safe_log_ratio(logp, old_logp).exp().data
    low = 0.0 if clip_eps is None else 1.0 - clip_eps
    weight = logp.xp.clip(ratio, low, 1.0 + clip_eps_high)
    per_token = -(A * Tensor(weight, dtype=logp.dtype)) * logp
    stats = {"weight_clip_fraction": _fraction((weight != ratio).astype(logp.dtype), m)}
    loss = _keep(per_token, m).sum() / _num_tokens(num_tokens, m)
    return _with_reference_kl(loss, logp, ref_logp, m, beta, stats, "bnpo"), stats


def gmpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.0, clip_eps=0.4, clip_eps_high=None):
    """GMPO (Zhao et al. 2025, Geometric-Mean Policy Optimization): the geometric mean of the
    token ratios, each clipped in log space, as one ratio per sequence,

        ℓ_t = sgn(A_i) · min(sgn(A_i) log ρ_t, sgn(A_i) clip(log ρ_t, −ε_low, ε_high))
        s_i = exp( Σ_t m_t ℓ_t / |y_i| ),      L = mean_i −A_i s_i

    so a token with an extreme ratio moves s_i far less than it moves an arithmetic mean (GRPO's
    token average). Clipping log ρ at ±0.4 as the paper does (verl's default). Arguments as in
    gspo_loss; a response with no tokens adds 0. Returns (loss, stats) with clip_fraction (share
    of tokens where the clipped branch is taken) and kl.
    """
    _check_nonnegative(beta, "beta")
    _check_positive(clip_eps, "clip_eps")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    _check_positive(eps_high, "clip_eps_high")
    logp_in = _per_token(logp, "logp")
    A = _const(advantages, logp_in, "advantages", (logp_in.shape[0],))
    logp, old_logp, _, m = _policy_inputs(logp_in, old_logp, A.data, mask)
    xp = logp.xp
    sign = xp.sign(A.data)[:, None]
    log_ratio = _safe_log_ratio(logp, old_logp)
    unclipped = log_ratio * sign
    clipped = F.clip(log_ratio, -clip_eps, eps_high) * sign
    per_token = F.minimum(unclipped, clipped) * sign
    lengths = xp.maximum(m.sum(axis=1), 1.0)
    s = F.clip(_keep(per_token, m).sum(axis=1) / lengths, -MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    nonempty = (m.sum(axis=1) > 0).astype(logp.dtype)
    loss = _row_mean(_keep(-A * s, nonempty))
    stats = {"clip_fraction": _fraction((clipped.data < unclipped.data).astype(logp.dtype), m)}
    return _with_reference_kl(loss, logp, ref_logp, m, beta, stats, "grpo"), stats


def sapo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.0, tau_pos=1.0, tau_neg=1.05):
    """SAPO (Gao et al. 2025, Soft Adaptive Policy Optimization): a smooth gate in place of the
    hard clip, with a steeper one for negative advantages,

        f(ρ) = (4/τ) σ(τ (ρ − 1)),   τ = τ_pos if A > 0 else τ_neg,   ℓ_t = −f(ρ_t) · A_t

    aggregated as GRPO does (token mean per sequence, then mean). f'(1) = 1, so at ρ = 1 the
    gradient is the policy gradient; away from 1 it fades as 4 σ(1 − σ) ρ instead of dropping to
    0 at a clip edge. tau_pos, tau_neg > 0 (the paper's 1.0 and 1.05). Other arguments as in
    grpo_loss. Returns (loss, stats) with kl.
    """
    _check_nonnegative(beta, "beta")
    _check_positive(tau_pos, "tau_pos")
    _check_positive(tau_neg, "tau_neg")
    logp, old_logp, A, m = _policy_inputs(logp, old_logp, advantages, mask)
    ratio = _safe_log_ratio(logp, old_logp).exp()
    tau = logp.xp.where(A.data > 0, tau_pos, tau_neg).astype(logp.dtype)
    per_token = -A * (4.0 / tau) * F.sigmoid(tau * (ratio - 1.0))
    stats = {}
    loss = _aggregate(per_token, m, "grpo")
    return _with_reference_kl(loss, logp, ref_logp, m, beta, stats, "grpo"), stats


def _covariance(logp, A, m):
    """Per-token Cov_t = (log π_t − mean log π) · (A_t − mean A), means over the batch's response
    tokens (Cui et al. 2025, eq. 11's centred product): a detached array (B, T), 0 under the mask."""
    xp = logp.xp
    n = xp.maximum(m.sum(), 1.0)
    A = xp.broadcast_to(A.data, m.shape) * m
    lp = logp.data * m
    return (lp - lp.sum() / n) * (A - A.sum() / n) * m


def clip_cov_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.0, clip_eps=0.2, clip_eps_high=None,
                  clip_ratio=2e-4, cov_low=1.0, cov_high=5.0, seed=0, num_tokens=None):
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", §5): PPO's clipped
    surrogate, token mean, with the gradient of a few high-covariance tokens cut off. The tokens
    whose Cov_t = (log π_t − mean log π)(A_t − mean A) lies in [cov_low, cov_high] are the
    candidates; max(1, ⌊clip_ratio · N⌋) of them, drawn at random (``seed``), contribute 0 to the
    loss, as in verl (N = Σ m; verl's defaults 2e-4, 1, 5). Their covariance is what drives entropy
    collapse. The selection runs on the host (one device-to-host copy of the (B, T) covariances).
    Other arguments as in grpo_loss. Returns (loss, stats) with clip_fraction, cov_fraction
    (share of tokens cut off) and kl.
    """
    _check_nonnegative(beta, "beta")
    eps_high = _check_clip(clip_eps, clip_eps_high)
    _check_nonnegative(clip_ratio, "clip_ratio")
    _check_finite(cov_low, "cov_low")
    _check_finite(cov_high, "cov_high")
    if cov_low > cov_high:
        raise ValueError(f"cov_high: must be >= cov_low ({cov_low}), got {cov_high}")
    logp, old_logp, A, m = _policy_inputs(logp, old_logp, advantages, mask)
    xp = logp.xp
    cov = _covariance(logp, A, m)
    candidates = backend.to_numpy(xp.flatnonzero(((cov >= cov_low) & (cov <= cov_high) & (m > 0)).reshape(-1)))
    count = min(max(int(clip_ratio * float(m.sum())), 1), candidates.size)
    cut = np.zeros(m.size)
    cut[np.random.default_rng(seed).permutation(candidates)[:count]] = 1
    keep = m * (1 - xp.asarray(cut.reshape(m.shape), dtype=m.dtype))
    ratio = _safe_log_ratio(logp, old_logp).exp()
    per_token, clipped = _clipped_surrogate(ratio, A, clip_eps, eps_high)
    loss = _keep(per_token, keep).sum() / _num_tokens(num_tokens, m)
    stats = {"clip_fraction": _fraction(clipped, m), "cov_fraction": _fraction(m - keep, m)}
    return _with_reference_kl(loss, logp, ref_logp, m, beta, stats, "bnpo"), stats


def kl_cov_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.0, kl_coef=1.0, top_ratio=2e-4,
                num_tokens=None):
    """KL-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", §5): the unclipped
    surrogate −ρ_t A_t, plus a KL penalty on the tokens of largest covariance only,

        ℓ_t = −ρ_t A_t + kl_coef · |log ρ_t| · [t among the top max(1, ⌊top_ratio · N⌋) by Cov_t]

    with Cov_t as in clip_cov_loss, token mean over N = Σ m (verl's convention). kl_coef >= 0 (1, as
    the paper's scripts set it; verl's config defaults to 0.1); top_ratio >= 0 (verl's 2e-4). Other arguments as in grpo_loss. Returns (loss, stats) with cov_fraction
    (share of penalised tokens) and kl.
    """
    _check_nonnegative(beta, "beta")
    _check_nonnegative(kl_coef, "kl_coef")
    _check_nonnegative(top_ratio, "top_ratio")
    logp, old_logp, A, m = _policy_inputs(logp, old_logp, advantages, mask)
    xp = logp.xp
    cov = backend.to_numpy(xp.where(m > 0, _covariance(logp, A, m), -np.inf)).reshape(-1)
    count = min(max(int(top_ratio * float(m.sum())), 1), int((cov > -np.inf).sum()))
    top = np.zeros(m.size)
    top[np.argsort(-cov, kind="stable")[:count]] = 1
    top = xp.asarray(top.reshape(m.shape), dtype=m.dtype)
    log_ratio = _safe_log_ratio(logp, old_logp)
    per_token = -A * log_ratio.exp() + kl_coef * top * F.abs(log_ratio)
    loss = _keep(per_token, m).sum() / _num_tokens(num_tokens, m)
    stats = {"cov_fraction": _fraction(top, m)}
    return _with_reference_kl(loss, logp, ref_logp, m, beta, stats, "bnpo"), stats


# the policy objectives a GRPO trainer can use in place of grpo_loss, all called as
# f(logp, old_logp, ref_logp, advantages, mask, beta=...) -> (loss, stats)
POLICY_OBJECTIVES = {"cispo": cispo_loss, "gmpo": gmpo_loss, "sapo": sapo_loss, "clip_cov": clip_cov_loss,
                     "kl_cov": kl_cov_loss, "gspo": gspo_loss}


# ------------------------------------------ a sampler that differs from the trainer
ROLLOUT_CORRECTIONS = ("tis", "tis_seq", "mis", "icepop")


def rollout_correction_weights(old_logp, sampler_logp, mask, mode="tis", low=0.5, high=None):
    """Importance weights that correct for a sampler (vLLM, a quantised or fused-kernel copy) whose
    probabilities π_s differ from the trainer's π_old for the same weights. With ρ_t = π_old(y_t)/π_s(y_t)
    and ρ_i = Π_t ρ_t the sequence ratio:

      "tis"      w_t = min(ρ_t, C)                      truncated IS, per token (Yao et al. 2025,
                                                        "Your efficient RL framework secretly brings you
                                                        off-policy RL training"; C = 2)
      "tis_seq"  w_t = min(ρ_i, C)                      the same per sequence
      "mis"      w_t = ρ_i · [ρ_i <= C]                 masked IS: a sequence beyond C is dropped, not
                                                        truncated (Liu et al. 2025, "When speed kills
                                                        stability"; C = 2)
      "icepop"   w_t = ρ_t · [low <= ρ_t <= high]       IcePop's two-sided token mask (Ling team 2025;
                                                        low = 0.5, high = 5)

    The trainer multiplies each token's policy loss by w_t (verl's rollout_is_weights); for a
    clipped surrogate that is the same as using the advantages w_t · A_t, since w_t >= 0.
    old_logp (B, T) the trainer's log π_old, sampler_logp (B, T) the sampler's (Rollout.logprobs,
    same temperature); mask (B, T); high = C (default 2, or 5 for "icepop"), low > 0 for "icepop".
    log ρ is clipped to ±MAX_LOG_RATIO. Returns a detached Tensor (B, T), 0 under the mask.
    """
    _check_option(mode, ROLLOUT_CORRECTIONS, "mode")
    high = (5.0 if mode == "icepop" else 2.0) if high is None else high
    _check_positive(high, "high")
    _check_positive(low, "low")
    if mode == "icepop" and low > high:
        raise ValueError(f"low: must be <= high ({high}) for mode 'icepop', got {low}")
    old = _per_token(old_logp, "old_logp").detach()
    m = _mask(mask, old)
    sampler = _keep(_const(sampler_logp, old, "sampler_logp", old.shape), m).data
    log_ratio = old.xp.clip(_keep(old, m).data - sampler, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    xp = old.xp
    if mode in ("tis", "icepop"):
        ratio = xp.exp(log_ratio)
    else:
        ratio = xp.broadcast_to(xp.exp(xp.clip(log_ratio.sum(axis=1, keepdims=True), -MAX_LOG_RATIO,
                                               MAX_LOG_RATIO)), m.shape)
    if mode in ("tis", "tis_seq"):
        w = xp.minimum(ratio, high)
    elif mode == "mis":
        w = xp.where(ratio <= high, ratio, 0)
    else:
        w = xp.where((ratio >= low) & (ratio <= high), ratio, 0)
    return Tensor((w * m).astype(old.dtype, copy=False), dtype=old.dtype)


# -------------------------------------------------------- DAPO's reward shaping
def overlong_penalty(lengths, max_length, buffer_length, penalty=1.0):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward of a response
    of |y| tokens, with L_max = max_length and L_cache = buffer_length:

        0                                 if |y| <= L_max − L_cache
        penalty · (L_max − L_cache − |y|) / L_cache    if L_max − L_cache < |y| <= L_max
        −penalty                          if |y| > L_max

    lengths (B,) response lengths in tokens; max_length a positive integer; buffer_length an
    integer in [1, max_length]; penalty >= 0 (DAPO: 1). Returns a float64 array (B,).
    """
    _check_int_range(max_length, 1, math.inf, "max_length", "the longest response in tokens")
    _check_int_range(buffer_length, 1, max_length, "buffer_length", "tokens before max_length where it starts")
    _check_nonnegative(penalty, "penalty")
    n = np.asarray(backend.to_numpy(lengths) if backend.is_cupy_array(lengths) else lengths, dtype=np.float64)
    if n.ndim != 1:
        raise ValueError(f"lengths: expected shape (B,), got {n.shape}")
    start = max_length - buffer_length
    return -penalty * np.clip((n - start) / buffer_length, 0.0, 1.0)


def informative_groups(rewards, group_size):
    """DAPO's dynamic sampling (Yu et al. 2025, eq. 11's constraint 0 < |{correct}| < G): True for
    the rows of every group whose rewards are not all equal. A group of equal rewards has advantage
    0 under any group baseline and only dilutes the token mean; the trainer drops it (DAPO samples
    more prompts to refill the batch; here the batch just shrinks). Their share is the
    ``frac_reward_zero_std`` metric. rewards (B,) in consecutive groups of group_size.
    Returns a bool array (B,) on the rewards' device.
    """
    r = _tensor(rewards, "rewards").detach()
    g = _groups(r, group_size).data
    varied = g.max(axis=1) != g.min(axis=1)
    return r.xp.repeat(varied, group_size)
