"""What both evaluation harnesses share: load a model once, and turn token-id prompts into answers
through the project's sampler, exactly as `python generate.py` does.

    em = load_eval_model(path, lora_path=..., ups_head=..., device=..., dtype=...)
    ids = generate_answer_ids(em, prompts, SamplerSettings(gen_length=256, ...), micro_batch=8)
    text = decode_answer(em.tokenizer, ids[0], max_new_tokens=512, stop_words=["Question:"])

Used by the OpenCompass classes (opencompass_patch.models) and the lm-evaluation-harness model
(eval_llada.py). Prompts of a micro-batch are left-padded with `pad_id` and passed with their
attention_mask, so a padded row decodes like the same prompt alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from remedi_patches.backbones import EvalModel, load_eval_model, resolve_dtype  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSettings:
    """The generate() arguments an evaluation config chooses (names as in generate.py)."""

    steps: int = 512
    gen_length: int = 512
    block_length: int = 512
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    confidence_source: Optional[str] = None  # None = upstream LLaDA sampling; 'ups', 'tps_prob', 'random', ...
    remask: bool = True

    def __post_init__(self):
        from generate import UPSTREAM_RULES
        from remedi_patches.confidence import get_confidence_source

        if self.remasking not in UPSTREAM_RULES:
            raise ValueError(f"unknown remasking {self.remasking!r}; use one of {sorted(UPSTREAM_RULES)}")
        if self.confidence_source is not None:
            get_confidence_source(self.confidence_source)


def optional_path(value) -> Optional[str]:
    """Config values meaning "none given" ('' and 'none' from command-line strings) -> None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return str(value)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-id lists -> (ids (B, Lp) left-padded with pad_id, attention_mask (B, Lp) of 1/0, None if unpadded)."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token; drop empty prompts before generating")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[row, width - len(p):] = 1
    return ids, None if bool(attention_mask.all()) else attention_mask


def fit_prompt(prompt: list[int], max_len: int) -> list[int]:
    """Keep the last max_len tokens (the question sits at the end of few-shot prompts), with a warning."""
    if max_len <= 0:
        raise ValueError(f"no room left for the prompt (max_len={max_len}); raise max_seq_len or lower gen_length")
    if len(prompt) <= max_len:
        return prompt
    logger.warning("prompt of %d tokens cut to its last %d tokens to fit the sequence length", len(prompt), max_len)
    return prompt[-max_len:]


def generate_answer_ids(em: EvalModel, prompts: Sequence[Sequence[int]], settings: SamplerSettings,
                        micro_batch: int = 1) -> list[list[int]]:
    """Sample an answer for each prompt; each answer is cut before its first EOS / EoT token."""
    from generate import generate

    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    answers = []
    for start in range(0, len(prompts), micro_batch):
        ids, attention_mask = left_pad(prompts[start:start + micro_batch], em.pad_id)
        ids = ids.to(em.device)
        attention_mask = None if attention_mask is None else attention_mask.to(em.device)
        out = generate(em.model, ids, attention_mask, steps=settings.steps, gen_length=settings.gen_length,
                       block_length=settings.block_length, temperature=settings.temperature,
                       cfg_scale=settings.cfg_scale, remasking=settings.remasking, mask_id=em.mask_id,
                       logits_eos_inf=settings.logits_eos_inf, confidence_eos_eot_inf=settings.confidence_eos_eot_inf,
                       confidence_source=settings.confidence_source, ups_head=em.ups_head, remask=settings.remask,
                       eos_id=em.eos_id, eot_id=em.eot_id)  # (b, Lp + gen_length)
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((j for j, t in enumerate(row) if t in em.stop_ids), len(row))
            answers.append(row[:cut])
    return answers


def trim_at_stop_words(text: str, stop_words: Sequence[str]) -> str:
    """Text before the earliest occurrence of any stop word."""
    cut = min((i for i in (text.find(s) for s in stop_words if s) if i >= 0), default=len(text))
    return text[:cut]


def decode_answer(tokenizer, answer_ids: Sequence[int], max_new_tokens: Optional[int] = None,
                  stop_words: Sequence[str] = ()) -> str:
    """At most max_new_tokens answer tokens, decoded without special tokens, cut at the first stop word."""
    if max_new_tokens is not None:
        answer_ids = answer_ids[:max_new_tokens]
    return trim_at_stop_words(tokenizer.decode(list(answer_ids), skip_special_tokens=True), stop_words)
