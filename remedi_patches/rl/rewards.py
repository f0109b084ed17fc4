"""Rewards for the RL trainer: a reward is a function `(prompt, response, reference) -> float`.

Built-in correctness rewards (1.0 right, 0.0 wrong or no answer) reuse the project's graders: `gsm8k` and
`embedded` compare the final number (`#### N`) with the reference solution, `math` compares the last `\\boxed{}`
with the reference answer (a full solution's `\\boxed{}` or the answer itself; math-verify when installed).
Any other reward is plugged in by Python path, and a format bonus can be added on top:

    reward = load_reward("gsm8k", format_weight=0.1)        # +0.1 when the response has `#### <number>`
    reward("What is 2+3?", "2+3=5. #### 5", "#### 5")        # -> 1.1
    reward.name                                              # -> 'gsm8k', for the logs
    rewards = score(reward, prompts, responses, references)  # (N,) float32 tensor

    load_reward("my_pkg.rewards:length_penalty")             # a function of an importable module
    load_reward("rewards/mine.py:judge", format_weight=0.2, format_kind="math")   # one of a file
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import math
import numbers
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch

from remedi_patches.cli import UserError, one_line
from remedi_patches.graders import extract_boxed, grade_gsm8k, grade_math

RewardFn = Callable[[str, str, str], float]


def gsm8k_reward(prompt: str, response: str, reference: str) -> float:
    """1.0 when the response's final number equals the reference's (`#### N` solution or the number)."""
    return 1.0 if grade_gsm8k(response, reference) else 0.0


def math_reward(prompt: str, response: str, reference: str) -> float:
    """1.0 when the response's last `\\boxed{}` equals the reference answer (its `\\boxed{}` or the text)."""
    return 1.0 if grade_math(response, extract_boxed(reference) or reference) else 0.0


REWARDS: dict[str, RewardFn] = {"gsm8k": gsm8k_reward, "embedded": gsm8k_reward, "math": math_reward}

_HASH_NUMBER = re.compile(r"####\s*[-\u2212]?\$?\.?\d")


def _has_hash_answer(response: str) -> bool:
    return _HASH_NUMBER.search(response) is not None


def _has_boxed(response: str) -> bool:
    return extract_boxed(response) is not None


FORMATS: dict[str, Callable[[str], bool]] = {
    "gsm8k": _has_hash_answer,
    "embedded": _has_hash_answer,
    "math": _has_boxed,
}


def format_ok(kind: str, response: str) -> bool:
    """Whether the response has the answer format of `kind` (`#### <number>` or a `\\boxed{...}`)."""
    if kind not in FORMATS:
        raise UserError(f"unknown answer format {kind!r}; choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[kind](response)


@dataclasses.dataclass(frozen=True)
class Reward:
    """A reward as loaded by `load_reward`: `fn` plus `format_weight` when the response has `format_kind`'s format."""

    name: str
    fn: RewardFn = dataclasses.field(repr=False)
    format_weight: float = 0.0
    format_kind: Optional[str] = None

    def __call__(self, prompt: str, response: str, reference: str) -> float:
        value = self.fn(prompt, response, reference)
        numeric = isinstance(value, (numbers.Real, torch.Tensor))  # anything else is left for `score` to report
        if self.format_weight and numeric and format_ok(self.format_kind, response):
            value = value + self.format_weight
        return value


def _import_file(path_text: str) -> ModuleType:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"reward file {path_text!r} not found; give an existing 'path/to/file.py:function'")
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_remedi_reward_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import reward file {path_text!r} as Python; give a '.py' file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        message = f"cannot import reward file {path_text!r} ({type(exc).__name__}: {exc}); fix the file"
        raise UserError(one_line(message)) from exc
    return module


def _import_module(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise UserError(one_line(
            f"cannot import reward module {module_name!r} ({type(exc).__name__}: {exc}); check the name, install it "
            "or put its folder on PYTHONPATH, or give a file as 'path/to/file.py:function'"
        )) from exc


def _load_custom(spec: str) -> RewardFn:
    """The function named by `module:function` or `path/to/file.py:function`."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise UserError(f"reward {spec!r} is not of the form 'package.module:function' or 'path/to/file.py:function'")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(where) if is_file else _import_module(where)
    if not hasattr(module, attr):
        raise UserError(f"reward {spec!r}: {where!r} has no attribute {attr!r}; define it or fix the name after ':'")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserError(
            f"reward {spec!r} is a {type(fn).__name__}, not callable; point at a function "
            "(prompt, response, reference) -> float"
        )
    return fn


def load_reward(spec: str, format_weight: float = 0.0, format_kind: Optional[str] = None) -> Reward:
    """The reward named `spec` (a name in REWARDS, `package.module:function` or `path/to/file.py:function`), plus
    `format_weight` when the response has `format_kind`'s answer format (default: the built-in's own format)."""
    if isinstance(format_weight, bool) or not isinstance(format_weight, numbers.Real) or not (
        math.isfinite(format_weight) and format_weight >= 0
    ):
        raise UserError(f"format weight {format_weight!r} must be a finite number >= 0")
    if spec in REWARDS:
        fn = REWARDS[spec]
        format_kind = format_kind or spec
    elif ":" in spec:
        fn = _load_custom(spec)
    else:
        raise UserError(
            f"unknown reward {spec!r}; choose one of {', '.join(sorted(REWARDS))} or give a Python path "
            "'package.module:function' or 'path/to/file.py:function'"
        )
    if format_weight > 0 and format_kind is None:
        raise UserError(
            f"custom reward {spec!r} with a format weight needs a format kind; "
            f"choose one of {', '.join(sorted(FORMATS))}"
        )
    if format_kind is not None and format_kind not in FORMATS:
        raise UserError(f"unknown answer format {format_kind!r}; choose one of {', '.join(sorted(FORMATS))}")
    return Reward(spec, fn, float(format_weight), format_kind)


def _as_float(value: object) -> Optional[float]:
    """A finite float from a Python / NumPy number or a one-element tensor, else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def score(
    reward: RewardFn, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str]
) -> torch.Tensor:
    """The (N,) float32 tensor of `reward` over aligned prompts, responses and references."""
    if not len(prompts) == len(responses) == len(references):
        raise ValueError(
            f"score needs as many prompts, responses and references; got {len(prompts)}, {len(responses)} "
            f"and {len(references)}"
        )
    name = getattr(reward, "name", getattr(reward, "__qualname__", repr(reward)))
    values = []
    for i, (prompt, response, reference) in enumerate(zip(prompts, responses, references)):
        value = reward(prompt, response, reference)
        as_float = _as_float(value)
        if as_float is None:
            raise UserError(f"reward {name!r} returned {value!r} for sample {i}; it must return a finite number")
        values.append(as_float)
    return torch.tensor(values, dtype=torch.float32)
