"""Confidence sources for dynamic remasking: how much the sampler trusts each block position.

A source maps the step's `ConfidenceInputs` to a (B, N) score over the N positions of the
current block; higher means "keep this token". Registering a new source is one function:

    @register("my_source")
    def my_source(inp: ConfidenceInputs) -> torch.Tensor:
        return ...  # (B, N)

Built in (DESIGN.md 3.2 and the plan's TPS heuristics):
    ups       sigmoid(h), the UPS's verdict on the token at the position (h: the model's .confidences, from a
              UPS head or the dual-stream model's own UPS stream); the sampler may instead draw the ranking from
              softmax(h / ups_temperature) (remasking.plackett_luce_keys)
    tps_prob  TPS probability of the candidate (for unmasked positions: of the token there);
              restricted to masked positions this is upstream LLaDA's `low_confidence`
    tps_logit raw TPS logit of the candidate: the official RemeDi inference's ranking (for reproducing it)
    random    uniform noise; drawn as upstream's (B, L) `torch.rand` so the RNG stream matches
    margin    p(candidate) - max over other tokens p; top-1 minus top-2 when the candidate is the argmax
    entropy   negative entropy of the TPS distribution (low entropy = confident)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import torch

ConfidenceFn = Callable[["ConfidenceInputs"], torch.Tensor]
CONFIDENCE_SOURCES: dict[str, ConfidenceFn] = {}


@dataclass
class ConfidenceInputs:
    logits: torch.Tensor                # (B, N, V) TPS logits of the block (after CFG / EOS gating)
    candidates: torch.Tensor            # (B, N) candidate token per block position
    ups_logits: Optional[torch.Tensor]  # (B, N) UPS logits h of the block, or None
    seq_len: int                        # L, the whole sequence length (for upstream's RNG shape)
    block: slice                        # the block's positions within the sequence

    @cached_property
    def probs(self) -> torch.Tensor:  # (B, N, V), in the logits' dtype as upstream
        return self.logits.softmax(dim=-1)

    @cached_property
    def candidate_probs(self) -> torch.Tensor:  # (B, N)
        return self.probs.gather(-1, self.candidates.unsqueeze(-1)).squeeze(-1)


def register(name: str) -> Callable[[ConfidenceFn], ConfidenceFn]:
    def add(fn: ConfidenceFn) -> ConfidenceFn:
        if name in CONFIDENCE_SOURCES:
            raise ValueError(f"confidence source {name!r} is already registered; pick another name")
        CONFIDENCE_SOURCES[name] = fn
        return fn

    return add


def get_confidence_source(name: str) -> ConfidenceFn:
    if name not in CONFIDENCE_SOURCES:
        raise ValueError(
            f"unknown confidence source {name!r}; choose one of {sorted(CONFIDENCE_SOURCES)} "
            "or register a new one with remedi_patches.confidence.register"
        )
    return CONFIDENCE_SOURCES[name]


@register("ups")
def ups(inp: ConfidenceInputs) -> torch.Tensor:
    if inp.ups_logits is None:
        raise ValueError("confidence source 'ups' needs UPS logits: pass ups_head= or a model returning RemeDiOutput")
    return inp.ups_logits.float().sigmoid()


@register("tps_prob")
def tps_prob(inp: ConfidenceInputs) -> torch.Tensor:
    return inp.candidate_probs


@register("tps_logit")
def tps_logit(inp: ConfidenceInputs) -> torch.Tensor:
    return inp.logits.gather(-1, inp.candidates.unsqueeze(-1)).squeeze(-1)


@register("random")
def random(inp: ConfidenceInputs) -> torch.Tensor:
    b = inp.candidates.shape[0]
    return torch.rand((b, inp.seq_len), device=inp.candidates.device)[:, inp.block]


@register("margin")
def margin(inp: ConfidenceInputs) -> torch.Tensor:
    others = inp.probs.scatter(-1, inp.candidates.unsqueeze(-1), -1.0)  # candidate knocked out
    return inp.candidate_probs - others.amax(dim=-1)


@register("entropy")
def entropy(inp: ConfidenceInputs) -> torch.Tensor:
    logp = inp.logits.float().log_softmax(dim=-1)
    return (logp.exp() * logp).nan_to_num().sum(dim=-1)  # -H; 0 * -inf terms (EOS gating) count as 0
