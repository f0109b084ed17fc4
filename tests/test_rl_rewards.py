import math
import sys

import pytest
import torch

from remedi_patches.cli import UserError
from remedi_patches.rl.rewards import FORMATS, REWARDS, Reward, format_ok, load_reward, score

EMBEDDED_REF = "14+7=21. 21-9=12. 12*2=24. #### 24"
MATH_REF = "The sum is $\\frac{1}{2}+\\frac{1}{4}=\\boxed{\\dfrac{3}{4}}$."


# ---------------------------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    "name, response, reference, expected",
    [
        ("gsm8k", "She pays 1,600 dollars. #### 1600", "800*2=1600\n#### 1,600", 1.0),
        ("gsm8k", "#### 1500", "800*2=1600\n#### 1600", 0.0),
        ("gsm8k", "I do not know.", "1600", 0.0),
        ("embedded", "14+7=21. 21-9=12. 12*2=24. #### 24", EMBEDDED_REF, 1.0),
        ("embedded", "14+7=21. 21-9=12. 12*2=25. #### 25", EMBEDDED_REF, 0.0),
        ("embedded", "", EMBEDDED_REF, 0.0),
        # string normalisation settles these (\dfrac -> \frac, spaces), so math-verify is not needed
        ("math", "so the answer is \\boxed{\\frac{3}{4}}", MATH_REF, 1.0),
        ("math", "\\boxed{\\frac 3 4}", "\\frac 3 4", 1.0),
        ("math", "\\boxed{7}", MATH_REF, 0.0),
        ("math", "the answer is 3/4", MATH_REF, 0.0),
    ],
)
def test_builtin_rewards(name, response, reference, expected):
    assert REWARDS[name]("prompt", response, reference) == expected
    assert load_reward(name)("prompt", response, reference) == expected


@pytest.mark.parametrize(
    "kind, response, expected",
    [
        ("gsm8k", "so 24 apples\n#### 24", True),
        ("gsm8k", "#### -3.5", True),
        ("gsm8k", "so 24 apples", False),
        ("gsm8k", "#### none", False),
        ("embedded", "12*2=24. #### 24", True),
        ("math", "\\boxed{x^2}", True),
        ("math", "\\boxed{", False),
        ("math", "#### 24", False),
    ],
)
def test_format_ok(kind, response, expected):
    assert format_ok(kind, response) is expected
    assert FORMATS[kind](response) is expected


def test_format_ok_unknown_kind():
    with pytest.raises(UserError, match="unknown answer format 'boxed'.*gsm8k"):
        format_ok("boxed", "\\boxed{1}")


def test_format_bonus_added_only_when_the_format_holds():
    reward = load_reward("gsm8k", format_weight=0.25)
    assert reward("p", "#### 24", "24") == pytest.approx(1.25)  # right and formatted
    assert reward("p", "#### 23", "24") == pytest.approx(0.25)  # wrong but formatted
    assert reward("p", "it is 24", "24") == pytest.approx(1.0)  # right (last number) but unformatted
    assert reward("p", "no idea", "24") == 0.0
    # another format than the reward's own
    boxed = load_reward("gsm8k", format_weight=0.5, format_kind="math")
    assert boxed("p", "\\boxed{24}", "24") == pytest.approx(1.5)
    assert boxed("p", "#### 24", "24") == pytest.approx(1.0)


def test_reward_has_a_name_and_readable_repr():
    reward = load_reward("math", format_weight=0.1)
    assert isinstance(reward, Reward)
    assert reward.name == "math" and reward.format_kind == "math" and reward.format_weight == 0.1
    assert repr(reward) == "Reward(name='math', format_weight=0.1, format_kind='math')"
    assert load_reward("embedded").format_weight == 0.0


# ---------------------------------------------------------------------------------------------------- custom


CUSTOM_SOURCE = """
def length_reward(prompt, response, reference):
    return len(response) / 10

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(CUSTOM_SOURCE)
    return path


def test_custom_reward_from_a_file(reward_file):
    reward = load_reward(f"{reward_file}:length_reward")
    assert reward.name == f"{reward_file}:length_reward"
    assert reward("p", "abcde", "ref") == 0.5
    with_format = load_reward(f"{reward_file}:length_reward", format_weight=1.0, format_kind="gsm8k")
    assert with_format("p", "#### 12", "ref") == pytest.approx(1.7)
    assert with_format("p", "12", "ref") == pytest.approx(0.2)


def test_custom_reward_from_a_relative_file(reward_file, monkeypatch):
    monkeypatch.chdir(reward_file.parent)
    assert load_reward("my_rewards.py:length_reward")("p", "abc", "r") == pytest.approx(0.3)


def test_custom_reward_from_a_module(reward_file, monkeypatch):
    monkeypatch.syspath_prepend(str(reward_file.parent))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    reward = load_reward("my_rewards:length_reward")
    assert reward("p", "abcdefghij", "ref") == 1.0


def test_custom_reward_with_format_weight_needs_a_kind(reward_file):
    with pytest.raises(UserError, match="needs a format kind"):
        load_reward(f"{reward_file}:length_reward", format_weight=0.1)
    # without a bonus no kind is needed
    assert load_reward(f"{reward_file}:length_reward", format_weight=0.0).format_kind is None


# ---------------------------------------------------------------------------------------------------- bad specs


def test_unknown_name_lists_builtins_and_the_path_form():
    with pytest.raises(UserError) as info:
        load_reward("gsm9k")
    message = str(info.value)
    assert "unknown reward 'gsm9k'" in message
    assert "embedded, gsm8k, math" in message and "module:function" in message and "\n" not in message


@pytest.mark.parametrize("spec", [":fn", "my_rewards:", "my_rewards:not-a-name"])
def test_malformed_python_path(spec):
    with pytest.raises(UserError, match="is not of the form 'package.module:function'"):
        load_reward(spec)


def test_module_that_cannot_be_imported():
    with pytest.raises(UserError, match="cannot import reward module 'no_such_module_xyz'.*No module named"):
        load_reward("no_such_module_xyz:fn")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="reward file .*missing.py' not found"):
        load_reward(f"{tmp_path / 'missing.py'}:fn")


def test_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def f(:\n")
    with pytest.raises(UserError, match="cannot import reward file .*broken.py' \\(SyntaxError"):
        load_reward(f"{path}:f")


def test_missing_attribute(reward_file):
    with pytest.raises(UserError, match="has no attribute 'lenght_reward'; define it or fix the name"):
        load_reward(f"{reward_file}:lenght_reward")


def test_attribute_that_is_not_callable(reward_file):
    with pytest.raises(UserError, match="NOT_A_FUNCTION' is a int, not callable"):
        load_reward(f"{reward_file}:NOT_A_FUNCTION")


@pytest.mark.parametrize("weight", [-0.1, math.nan, math.inf, "0.1"])
def test_bad_format_weight(weight):
    with pytest.raises(UserError, match="format weight .* must be a finite number >= 0"):
        load_reward("gsm8k", format_weight=weight)


def test_unknown_format_kind():
    with pytest.raises(UserError, match="unknown answer format 'latex'"):
        load_reward("gsm8k", format_weight=0.1, format_kind="latex")


# ---------------------------------------------------------------------------------------------------- score


def test_score_shape_and_dtype():
    rewards = score(
        load_reward("embedded", format_weight=0.5),
        ["p1", "p2", "p3"],
        ["12*2=24. #### 24", "#### 7", "24"],
        [EMBEDDED_REF] * 3,
    )
    assert rewards.shape == (3,) and rewards.dtype == torch.float32
    assert rewards.tolist() == [1.5, 0.5, 1.0]
    assert score(REWARDS["gsm8k"], [], [], []).shape == (0,)


def test_score_accepts_ints_bools_and_one_element_tensors():
    values = iter([1, torch.tensor(0.5), True])
    rewards = score(lambda p, r, ref: next(values), ["a"] * 3, ["b"] * 3, ["c"] * 3)
    assert rewards.tolist() == [1.0, 0.5, 1.0]


def test_score_wrong_lengths():
    with pytest.raises(ValueError, match="as many prompts, responses and references; got 2, 1 and 2"):
        score(REWARDS["gsm8k"], ["a", "b"], ["#### 1"], ["1", "2"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, None, "1.0", torch.tensor([1.0, 2.0])])
def test_score_rejects_non_finite_or_non_numbers(bad):
    def reward(prompt, response, reference):
        return bad if response == "bad" else 1.0

    named = Reward("my_reward", reward)
    with pytest.raises(UserError, match=r"reward 'my_reward' returned .* for sample 2; it must return a finite number"):
        score(named, ["p"] * 3, ["ok", "ok", "bad"], ["r"] * 3)


def test_score_reports_a_non_number_even_with_a_format_bonus():
    reward = Reward("none_reward", lambda p, r, ref: None, format_weight=0.5, format_kind="gsm8k")
    with pytest.raises(UserError, match="reward 'none_reward' returned None for sample 0"):
        score(reward, ["p"], ["#### 1"], ["1"])
