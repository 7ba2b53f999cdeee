"""The addition task with optional working: the answer after the last "=" decides the reward, so the
working in front of it changes a response's length and nothing else."""
from hypothesis import given
from hypothesis import strategies as st

from minirlhf.tasks.arithmetic import Problem
from minirlhf.tasks.environment import TaskConfig
from minirlhf.tasks.working import WorkingEnvironment, final_answer, worked_answer, working_reward


@given(st.integers(10, 99), st.integers(10, 99), st.integers(0, 4))
def test_working_of_any_length_keeps_a_right_answer_right(a, b, repeats):
    p = Problem(a, b)
    assert working_reward(worked_answer(p, repeats), p) == 1.0
    assert working_reward(worked_answer(Problem(a, b + 1), repeats), p) == 0.0


def test_the_answer_is_after_the_last_equals_sign():
    p = Problem(12, 34)
    assert final_answer("12+34=46") == "46" and final_answer("46") == "46"
    assert working_reward("12+34=45=46", p) == 1.0
    assert working_reward("46=45", p) == 0.0
    assert working_reward("12+34 12+34=", p) == 0.0


def test_demonstrations_spread_over_every_amount_of_working_and_fit_the_generation_budget():
    env = WorkingEnvironment(TaskConfig(n_heldout=20, n_train_prompts=50), seed=0, max_working=2)
    demos = env.demonstrations(60, seed=0)
    lengths = {len(r) for _, r in demos}
    assert len(lengths) >= 3 and max(lengths) <= env.max_new_tokens
    assert all(r[-1] == env.eos_id for _, r in demos)
    for prompt, response in demos:
        a, b = env.tokenizer.decode(prompt).split("What is ")[1].split("?")[0].split("+")
        assert working_reward(env.text(response), Problem(int(a), int(b))) == 1.0


def test_the_environment_scores_with_the_working_reward():
    env = WorkingEnvironment(TaskConfig(n_heldout=20, n_train_prompts=50), seed=0)
    p = env.train[0]
    ids = env.task.answer_ids(env.tokenizer, f"{p.a}+{p.b}={p.answer}")
    assert env.rule_reward("train")([0], [ids]) == [1.0]
    assert env.gold_score("train")([0], [ids]) == [1.0]
