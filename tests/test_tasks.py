"""The shipped tasks: addition prompts, the rule reward, the held-out split, the hidden rater."""
import math

import numpy as np
import pytest

from minirlhf.tasks import (AdditionTask, Problem, bradley_terry_probability, gold_score, label_pairs, parse_answer,
                            perturbations, rule_reward, task_tokenizer)


@pytest.mark.parametrize("text", ["936", " 936 ", "936.", "936 .", "\\boxed{936}", "The answer is \\boxed{936}.",
                                  "\n936\n", "+936"])
def test_parse_answer_is_lenient_about_form(text):
    assert parse_answer(text) == 936


@pytest.mark.parametrize("text", ["", "93 6", "936 or 937", "nine hundred", "936!", "\\boxed{}", "9.36", "abc936"])
def test_parse_answer_rejects_what_states_no_single_number(text):
    assert parse_answer(text) is None


def test_parse_answer_reads_thousands_commas_and_the_last_box():
    assert parse_answer("1,234") == 1234
    assert parse_answer("\\boxed{1} no, \\boxed{12}") == 12


def test_rule_reward_is_one_exactly_for_the_right_sum():
    p = Problem(347, 589)
    assert p.question == "What is 347+589?"
    assert rule_reward("936", p) == 1.0
    assert rule_reward("\\boxed{936}.", p) == 1.0
    assert rule_reward("937", p) == 0.0
    assert rule_reward("", p) == 0.0


def test_heldout_problems_never_appear_in_training_in_either_order():
    task = AdditionTask(digits=2, n_heldout=300, seed=3)
    held = {(p.a, p.b) for p in task.heldout}
    assert len(held) == 300
    train = task.train_problems(20000, np.random.default_rng(0))
    for p in train:
        assert (p.a, p.b) not in held and (p.b, p.a) not in held
        assert not task.is_heldout(p)
    assert all(task.is_heldout(p) for p in task.heldout)


def test_operands_have_the_asked_number_of_digits():
    task = AdditionTask(digits=3, n_heldout=50)
    for p in task.heldout + task.train_problems(200, np.random.default_rng(1)):
        assert 100 <= p.a < 1000 and 100 <= p.b < 1000


def test_split_depends_on_the_seed_only():
    a, b, c = AdditionTask(3, 40, seed=0), AdditionTask(3, 40, seed=0), AdditionTask(3, 40, seed=1)
    assert a.heldout == b.heldout
    assert a.heldout != c.heldout


@pytest.mark.parametrize("kwargs", [{"digits": 0}, {"digits": 2, "n_heldout": 0}, {"digits": 1, "n_heldout": 26}])
def test_bad_task_settings_are_named(kwargs):
    with pytest.raises(ValueError, match="digits|n_heldout"):
        AdditionTask(**kwargs)


def test_task_tokenizer_keeps_each_digit_one_token_and_uses_the_chat_template():
    task = AdditionTask(3, 10)
    tok = task_tokenizer(task)
    p = Problem(347, 589)
    prompt = task.prompt_ids(tok, p)
    pieces = [tok.decode([i]) for i in prompt]
    assert pieces[0] == "<|im_start|>" and pieces[-3:] == ["<|im_start|>", "assistant", "\n"]
    assert "".join(pieces).count("347+589") == 1
    for digit in "0123456789":
        assert len(tok.encode(digit)) == 1
    assert tok.encode("936") == [tok.encode(d)[0] for d in "936"]
    prompt_ids, response = task.demonstration(tok, p)
    assert response[-1] == tok.eos_id and tok.decode(response[:-1]) == "936"


def test_gold_score_is_one_for_right_graded_for_near_and_zero_for_no_number():
    p = Problem(347, 589)  # 936
    assert gold_score("936", p) == 1.0
    assert gold_score("nonsense", p) == 0.0
    assert gold_score("935", p) == pytest.approx(0.1 + 0.4 * 2 / 3)
    assert gold_score("836", p) == pytest.approx(0.1 + 0.4 * 2 / 3)
    assert gold_score("135", p) == pytest.approx(0.1 + 0.4 * 1 / 3)
    assert gold_score("1936", p) == pytest.approx(0.1 + 0.4 * 3 / 4)  # a wrong length costs a digit
    assert gold_score("936", p) > gold_score("935", p) > gold_score("125", p) > gold_score("x", p)


def test_bradley_terry_probability_is_a_logistic_of_the_score_gap():
    assert bradley_terry_probability(0.5, 0.5, 0.1) == 0.5
    assert bradley_terry_probability(1.0, 0.0, 0.1) == pytest.approx(1 / (1 + math.exp(-10)))
    assert bradley_terry_probability(0.0, 1.0, 0.1) + bradley_terry_probability(1.0, 0.0, 0.1) == pytest.approx(1)
    assert bradley_terry_probability(0.0, 1e6, 1e-3) == 0.0  # no overflow far out


def test_rater_labels_are_noisy_but_follow_the_gold_order_at_the_bradley_terry_rate():
    p = Problem(347, 589)
    rng = np.random.default_rng(0)
    temperature = 0.1
    agree = [label_pairs(p, ["936", "935"], 1, rng, temperature)[0].chosen == "936" for _ in range(4000)]
    expected = bradley_terry_probability(1.0, gold_score("935", p), temperature)
    assert abs(np.mean(agree) - expected) < 0.02
    assert 0.9 < expected < 1.0  # noisy, but mostly right


def test_rater_never_pairs_answers_of_equal_gold_score():
    p = Problem(347, 589)
    pairs = label_pairs(p, ["935", "937", "936", "936"], 10, np.random.default_rng(0))
    assert {frozenset((q.chosen, q.rejected)) for q in pairs} == {frozenset(("935", "936")), frozenset(("937", "936"))}
    assert label_pairs(p, ["935", "937"], 3, np.random.default_rng(0)) == []


def test_perturbations_are_wrong_well_formed_numbers_near_the_answer():
    rng = np.random.default_rng(0)
    for answer in (936, 1000, 100, 59):
        out = perturbations(answer, rng)
        assert out and str(answer) not in out
        for w in out:
            assert w.isdigit() and not (len(w) > 1 and w[0] == "0")
            assert 0 < gold_score(w, Problem(answer - answer // 2, answer // 2)) < 1
