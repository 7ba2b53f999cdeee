"""The RLHF theory, checked exactly on a language small enough to enumerate (minirlhf/exact.py):
the closed-form optimum π* = π_ref·exp(r/β)/Z and its value β·log Z, the reward recovered from
π*, DPO's minimiser on Bradley-Terry preferences, KL estimators' bias, and the policy-gradient
estimators built from minirlhf.losses averaging to the exact gradient of
J(π) = E_π[r] − β·KL(π‖π_ref).

Statistical tests are seeded and state their bound: an estimator's mean over K independent
batches must lie within Z_BOUND standard errors of the exact value in every coordinate (the
chance of a false alarm for an unbiased estimator over ~21 coordinates is ~1e-4), and its
mean squared error must shrink like 1/n (×4 samples → MSE ÷ 4, accepted within [2.8, 5.6]).
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minirlhf import Tensor, losses
from minirlhf import exact as E
from minirlhf.optim import AdamW, WarmupCosine
from gradcheck import check_grad

Z_BOUND = 4.5
BETA = 0.5

LANG = E.TabularLanguage(vocab_size=3, max_len=3)
_rng = np.random.default_rng(2024)
REF = E.TabularPolicy(LANG, _rng.normal(size=(LANG.num_prefixes, 3)))
POLICY_LOGITS = _rng.normal(size=(LANG.num_prefixes, 3))
REWARDS = _rng.normal(size=LANG.num_responses)
REF_LOGP = REF.sequence_logprobs().numpy()
REF_TOKEN_LOGP = REF.token_logprobs().numpy()


def objective_of(policy, beta=BETA):
    return E.rlhf_objective(policy.sequence_logprobs(), REF_LOGP, REWARDS, beta)


def exact_gradient(policy, beta=BETA):
    policy.zero_grad()
    objective_of(policy, beta).backward()
    return policy.logits.grad.copy()


# ---------------------------------------------------------------- the language
def test_language_lists_every_response_once_and_a_policy_sums_to_one_over_them():
    assert LANG.num_responses == 15 and len(set(LANG.responses)) == 15
    assert all(y[-1] == E.EOS or len(y) == 3 for y in LANG.responses)
    assert all(E.EOS not in y[:-1] for y in LANG.responses)
    assert REF.probs().sum() == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_array_equal(LANG.mask.sum(1), [len(y) for y in LANG.responses])


@given(arrays(np.float64, (LANG.num_prefixes, 3), elements=st.floats(-6, 6)))
def test_policy_from_sequence_logprobs_reproduces_the_response_distribution(logits):
    logp = E.TabularPolicy(LANG, logits).sequence_logprobs().numpy()
    rebuilt = E.policy_from_sequence_logprobs(LANG, logp).sequence_logprobs().numpy()
    np.testing.assert_allclose(rebuilt, logp, atol=1e-10)


def test_exact_gradient_of_the_objective_matches_finite_differences():
    check_grad(lambda logits: E.rlhf_objective(E.tabular_token_logprobs(LANG, logits).sum(axis=1),
                                               REF_LOGP, REWARDS, BETA), POLICY_LOGITS)


# --------------------------------------------------------- the optimal policy
OPTIMAL_LOGP, LOG_Z = E.optimal_policy(REF_LOGP, REWARDS, BETA)
OPTIMAL = E.policy_from_sequence_logprobs(LANG, OPTIMAL_LOGP)


def test_optimal_policy_value_is_beta_log_z_and_its_gradient_vanishes():
    assert objective_of(OPTIMAL).item() == pytest.approx(BETA * LOG_Z, rel=1e-12)
    np.testing.assert_allclose(exact_gradient(OPTIMAL), 0, atol=1e-12)


@given(arrays(np.float64, (LANG.num_prefixes, 3), elements=st.floats(-4, 4)))
def test_optimal_policy_beats_every_other_policy_by_beta_times_its_kl_to_the_optimum(logits):
    competitor = E.TabularPolicy(LANG, logits)
    J = objective_of(competitor).item()
    kl_to_optimum = E.sequence_kl(competitor.sequence_logprobs().numpy(), OPTIMAL_LOGP)
    assert J <= BETA * LOG_Z + 1e-12
    assert J == pytest.approx(BETA * LOG_Z - BETA * kl_to_optimum, rel=1e-10, abs=1e-12)


def test_reward_is_recovered_from_the_optimal_policy_as_beta_log_ratio_plus_beta_log_z():
    recovered = BETA * (OPTIMAL.sequence_logprobs().numpy() - REF_LOGP) + BETA * LOG_Z
    np.testing.assert_allclose(recovered, REWARDS, atol=1e-12)


def test_log_z_cancels_in_the_bradley_terry_likelihood():
    implicit = BETA * (OPTIMAL.sequence_logprobs().numpy() - REF_LOGP)  # the reward minus β log Z
    np.testing.assert_allclose(E.bradley_terry_probabilities(implicit), E.bradley_terry_probabilities(REWARDS),
                               atol=1e-13)


def test_expected_dpo_loss_is_the_bt_weighted_mean_of_dpo_loss_over_all_pairs():
    policy = E.TabularPolicy(LANG, POLICY_LOGITS)
    logp = policy.sequence_logprobs().numpy()
    P = E.bradley_terry_probabilities(REWARDS)
    S = LANG.num_responses
    total = 0.0
    for i in range(S):
        for j in range(S):
            if i != j:
                loss, _, _ = losses.dpo_loss(Tensor(logp[[i]], dtype=np.float64), Tensor(logp[[j]], dtype=np.float64),
                                             REF_LOGP[[i]], REF_LOGP[[j]], beta=BETA)
                total += P[i, j] * loss.item()
    assert E.expected_dpo_loss(policy.sequence_logprobs(), REF_LOGP, REWARDS, BETA).item() == \
        pytest.approx(total / (S * (S - 1) / 2), rel=1e-12)


def test_dpo_minimiser_on_bradley_terry_preferences_over_the_whole_space_is_the_optimal_policy():
    policy = E.TabularPolicy(LANG)
    optimizer = AdamW(policy.parameters(), lr=0.2, weight_decay=0.0)
    schedule = WarmupCosine(optimizer, warmup_steps=0, total_steps=500)
    for _ in range(500):
        optimizer.zero_grad()
        E.expected_dpo_loss(policy.sequence_logprobs(), REF_LOGP, REWARDS, BETA).backward()
        optimizer.step()
        schedule.step()
    np.testing.assert_allclose(policy.sequence_logprobs().numpy(), OPTIMAL_LOGP, atol=1e-6)
    assert objective_of(policy).item() == pytest.approx(BETA * LOG_Z, abs=1e-9)


# ------------------------------------------------------------------- KL estimators
POLICY = E.TabularPolicy(LANG, POLICY_LOGITS)
POLICY_LOGP = POLICY.sequence_logprobs().numpy()
TRUE_KL = E.sequence_kl(POLICY_LOGP, REF_LOGP)


def per_response_kl(estimator):
    """Σ_t k(y_t) for every response: (S,)."""
    k = losses.kl_estimate(POLICY.token_logprobs(), REF_TOKEN_LOGP, estimator).numpy()
    return (k * LANG.mask).sum(1)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_summed_over_tokens_are_unbiased_for_the_sequence_kl_by_enumeration(estimator):
    assert (np.exp(POLICY_LOGP) * per_response_kl(estimator)).sum() == pytest.approx(TRUE_KL, rel=1e-12)


def test_k2_is_biased_for_the_sequence_kl():
    assert abs((np.exp(POLICY_LOGP) * per_response_kl("k2")).sum() - TRUE_KL) > 0.01 * TRUE_KL


def test_exact_token_kl_summed_over_tokens_averages_to_the_sequence_kl():
    logits, ref_logits = POLICY_LOGITS[LANG.prefix_ids], REF.logits.data[LANG.prefix_ids]  # (S, L, V)
    kl_tokens = losses.kl_exact(Tensor(logits, dtype=np.float64), ref_logits, LANG.mask).numpy()
    assert (np.exp(POLICY_LOGP) * kl_tokens.sum(1)).sum() == pytest.approx(TRUE_KL, rel=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_sample_means_converge_to_the_sequence_kl(estimator):
    rng = np.random.default_rng(11)
    draws = per_response_kl(estimator)[POLICY.sample(20_000, rng)]
    z = (draws.mean() - TRUE_KL) / (draws.std(ddof=1) / math.sqrt(len(draws)))
    assert abs(z) < Z_BOUND


def test_k3_is_nonnegative_on_every_token_of_every_response():
    assert (losses.kl_estimate(POLICY.token_logprobs(), REF_TOKEN_LOGP, "k3").numpy() >= 0).all()


# ------------------------------------------------- policy-gradient estimators
GROUP = 4


def shaped_rewards(ids, logp):
    """r(y) − β log(π(y)/π_ref(y)): the sequence reward with the KL folded in (detached)."""
    return REWARDS[ids] - BETA * (logp.numpy().sum(1) - REF_TOKEN_LOGP[ids].sum(1))


def reinforce(policy, ids):
    logp = policy.token_logprobs(ids)
    return losses.reinforce_loss(logp, shaped_rewards(ids, logp), LANG.mask[ids]), 1.0


def reinforce_rloo(policy, ids):
    logp = policy.token_logprobs(ids)
    return losses.reinforce_loss(logp, shaped_rewards(ids, logp), LANG.mask[ids], baseline="rloo",
                                 group_size=GROUP), 1.0


def ppo_at_ratio_one(policy, ids):
    """Token rewards −β·k1 plus the score at the end, advantages by GAE(γ=1, λ=1) with V = 0
    (reward to go), PPO's loss with π_old = π. Its token mean is rescaled to a sum per response."""
    logp = policy.token_logprobs(ids)
    mask = LANG.mask[ids]
    rewards = losses.kl_penalty(logp, REF_TOKEN_LOGP[ids], mask, REWARDS[ids], BETA, estimator="k1")
    advantages, _ = losses.gae(rewards, np.zeros(mask.shape), mask, gamma=1.0, lam=1.0)
    loss, stats = losses.ppo_policy_loss(logp, logp.data, advantages, mask)
    assert float(stats["clip_fraction"]) == 0.0
    return loss, mask.sum() / len(ids)


def grpo_unscaled(policy, ids):
    """GRPO with scale "none" and Dr. GRPO's B·T normaliser (rescaled to a sum per response)."""
    logp = policy.token_logprobs(ids)
    advantages = losses.grpo_advantages(shaped_rewards(ids, logp), GROUP, scale="none")
    loss, _ = losses.grpo_loss(logp, logp.data, None, advantages, LANG.mask[ids], beta=0.0, loss_type="dr_grpo")
    return loss, LANG.max_len


def gradient_estimates(estimator, n, batches, seed):
    """−∇(loss) of ``batches`` independent batches of n responses from the policy: (batches, P·V)."""
    policy = E.TabularPolicy(LANG, POLICY_LOGITS)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        policy.zero_grad()
        loss, scale = estimator(policy, policy.sample(n, rng))
        loss.backward()
        out.append(-policy.logits.grad.reshape(-1) * scale)
    return np.array(out)


# estimator, and what its mean should be as a multiple of ∇J: the group mean of GRPO includes the
# sample itself, which shrinks the expected gradient by (G − 1)/G (RLOO's leave-one-out does not)
ESTIMATORS = {"reinforce": (reinforce, 1.0), "reinforce_rloo": (reinforce_rloo, 1.0),
              "ppo_at_ratio_one": (ppo_at_ratio_one, 1.0), "grpo_scale_none": (grpo_unscaled, (GROUP - 1) / GROUP)}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_policy_gradient_estimates_average_to_the_exact_gradient_with_error_shrinking_like_one_over_sqrt_n(name):
    estimator, factor = ESTIMATORS[name]
    target = factor * exact_gradient(E.TabularPolicy(LANG, POLICY_LOGITS)).reshape(-1)
    small = gradient_estimates(estimator, n=2 * GROUP, batches=300, seed=1)
    large = gradient_estimates(estimator, n=8 * GROUP, batches=300, seed=2)
    for estimates in (small, large):
        standard_error = estimates.std(axis=0, ddof=1) / math.sqrt(len(estimates))
        z = (estimates.mean(axis=0) - target) / standard_error
        assert np.abs(z).max() < Z_BOUND, f"{name}: largest |z| {np.abs(z).max():.2f}"
    mse_ratio = ((small - target) ** 2).sum(1).mean() / ((large - target) ** 2).sum(1).mean()
    assert 2.8 < mse_ratio < 5.6, f"{name}: MSE ratio for 4x the samples is {mse_ratio:.2f}, expected ~4"


def test_grpo_group_mean_baseline_is_detectably_biased_against_the_full_gradient():
    """The same z-test has the power to see GRPO's (G − 1)/G shrinkage, so the passing ones mean something."""
    target = exact_gradient(E.TabularPolicy(LANG, POLICY_LOGITS)).reshape(-1)
    estimates = gradient_estimates(grpo_unscaled, n=8 * GROUP, batches=300, seed=2)
    z = (estimates.mean(axis=0) - target) / (estimates.std(axis=0, ddof=1) / math.sqrt(len(estimates)))
    assert np.abs(z).max() > Z_BOUND
