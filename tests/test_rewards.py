"""Reward plug-ins (post_train/rewards.py) and the noisy-teacher addition task (post_train/tasks/addition.py):
functions load from a module or a file, receive the prompt set's extra columns, combine with weights, rows
no function applies to get a zero advantage, a failing function names the row; the strict parser rejects
everything but one correct answer span followed by EOS; the teacher is wrong on the hard subset at rate q."""

import numpy as np
import pytest

from deepseek_jax.post_train import group_advantages
from deepseek_jax.post_train.rewards import RewardError, Rewards, load_reward
from deepseek_jax.post_train.tasks import addition as A


def _ids(text, eos=True):
    return A.encode(text) + ([A.EOS_ID] if eos else [])


def test_strict_parser_accepts_only_one_correct_span_then_eos():
    want = A.answer(579)  # "<a>975</a>"
    cases = {"<a>975</a>": 1.0, "<a>975</a><a>975</a>": 0.0, "<a>975</a>5": 0.0, "5<a>975</a>": 0.0,
             "<a>976</a>": 0.0, "<a>975": 0.0, "": 0.0}
    texts = list(cases)
    got = A.exact_match(["123+456="] * len(texts), texts, [_ids(t) for t in texts], answer=[want] * len(texts))
    assert got == list(cases.values())
    # truncated (no EOS) and junk after the EOS score 0
    assert A.exact_match(["p"], [want], [_ids(want, eos=False)], answer=[want]) == [0.0]
    assert A.exact_match(["p"], [want], [_ids(want) + A.encode("1")], answer=[want]) == [0.0]
    assert A.decode(_ids(want) + A.encode("12")) == want


def test_teacher_drops_the_top_carry_on_the_hard_subset_at_rate_q():
    rows = A.sft_rows(4000, seed=0, digits=3, q=0.6)
    operands = [tuple(int(v[::-1]) for v in r["prompt"][:-1].split("+")) for r in rows]  # written reversed
    hard = np.array([r["hard"] for r in rows])
    assert (hard == [A.is_hard(a, b, 3) for a, b in operands]).all()
    right = np.array([r["completion"] == A.answer(a + b) for r, (a, b) in zip(rows, operands)])
    assert 0.3 <= hard.mean() <= 0.5  # carries into the hundreds: 45% of 3-digit problems
    assert right[~hard].all()
    wrong = 1 - right[hard].mean()
    assert abs(wrong - 0.6) <= 3 * np.sqrt(0.6 * 0.4 / hard.sum())
    a, b = 155, 251  # 55 + 51 = 106: carries into the hundreds; dropped: 306
    assert A.is_hard(a, b, 3) and not A.is_hard(111, 222, 3)
    assert A.prompt(a, b) == "551+152=" and A.answer(a + b) == "<a>604</a>"  # least significant digit first
    assert A.teacher_answer(a, b, 3, 1.0, np.random.default_rng(0)) == A.answer(306)
    assert A.sft_rows(5, seed=3) == A.sft_rows(5, seed=3)
    with pytest.raises(ValueError, match=r"characters \['x'\] are not in the vocabulary"):
        A.encode("1x2")


def length_bonus(prompts, completions, completion_ids, **columns):
    return [None if c == "" else 0.5 * len(c) for c in completions]


def test_weighted_rewards_columns_and_rows_without_reward(tmp_path):
    plugin = tmp_path / "my_reward.py"
    plugin.write_text("def seen(prompts, completions, completion_ids, answer, hard, **_):\n"
                      "    return [1.0 if h else None for h in hard]\n")
    seen = load_reward(f"{plugin}:seen")
    rewards = Rewards(((seen, 2.0), (load_reward("test_rewards:length_bonus"), 0.1)))
    completions = ["ab", "", "", "a"]
    total, per_fn = rewards(["p"] * 4, completions, [[1]] * 4, answer=["x"] * 4, hard=[True, True, False, False])
    np.testing.assert_allclose(total, [2.0 + 0.1, 2.0, np.nan, 0.05])
    assert set(per_fn) == {"seen", "length_bonus"}
    adv = np.asarray(group_advantages(np.array([1.0, 0.0, np.nan, np.nan]), 2))
    assert adv[2] == 0 and adv[3] == 0 and adv[0] > 0 > adv[1]
    with pytest.raises(ValueError, match="must look like module:function"):
        load_reward("no_colon")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_reward("test_rewards:missing")
    with pytest.raises(ValueError, match=r"reward\[0\]=.* must have the keys fn"):
        Rewards.from_specs([{"weight": 1.0}])


def test_a_failing_reward_names_the_prompt_and_completion():
    def picky(prompts, completions, completion_ids, **_):
        return [1.0 / (len(c) - 3) for c in completions]  # fails on a 3-character completion

    with pytest.raises(RewardError, match=r"picky failed on prompt '2\+2=', completion 'abc': ZeroDivisionError"):
        Rewards(((picky, 1.0),))(["1+1=", "2+2="], ["abcd", "abc"], [[1], [1]])
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        Rewards(((lambda p, c, i: [1.0], 1.0),))(["a", "b"], ["x", "y"], [[1], [1]])
    with pytest.raises(RewardError, match="returned nan"):
        Rewards(((lambda p, c, i: [float("nan")], 1.0),))(["a"], ["x"], [[1]])


def test_pass_at_k_equals_the_probability_over_all_k_subsets():
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) against brute force over every k-subset of n samples."""
    import itertools

    from deepseek_jax.post_train.evaluate import pass_at_k

    for n, c, k in ((8, 0, 1), (8, 3, 2), (8, 3, 4), (5, 1, 5), (6, 6, 3), (8, 2, 8)):
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        want = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert abs(pass_at_k(n, c, k) - want) < 1e-12, (n, c, k)


def test_keep_filters_parse_and_reject_bad_text():
    from deepseek_jax.post_train.sample import parse_keep

    assert parse_keep(None) is None
    eq, ge = parse_keep("reward==1"), parse_keep("reward >= 0.5")
    assert eq(1.0) and not eq(0.0) and ge(0.5) and not ge(0.49)
    with pytest.raises(ValueError, match="must look like reward==1"):
        parse_keep("score>1")


def test_decode_maps_ids_past_the_vocabulary_to_a_replacement_character():
    assert A.decode([A.encode("<a>")[0], 25, A.EOS_ID, 3]) == "<\ufffd"


def test_exact_match_judges_the_ids_not_a_decode_that_drops_unknown_ones():
    """The task tokenizer's decode skips ids past its vocabulary (the model's vocab_size is padded to 32):
    a completion with such an id must not score, even though its decoded text looks right."""
    want = "<a>21</a>"
    ids = A.encode("<a>2") + [25] + A.encode("1</a>") + [A.EOS_ID]
    text = A.tokenizer().decode(ids)
    assert text == want  # the hazard
    assert A.exact_match(["p"], [text], [ids], answer=[want]) == [0.0]
    assert A.exact_match(["p"], [want], [A.encode(want) + [A.EOS_ID]], answer=[want]) == [1.0]
