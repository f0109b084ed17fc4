"""The sampler: masked-diffusion denoising (upstream LLaDA, or RemeDi dynamic remasking) and the settings it owns.

    generate(model, prompt, ...)                 the algorithm, upstream LLaDA's signature (DESIGN.md 3.1; also
                                                 importable as `from generate import generate`)
    settings = SamplerSettings(steps=32, gen_length=32, block_length=32, confidence_source="ups")
    out = sample(bundle, input_ids, attention_mask, settings)      # bundle: backbones.EvalModel; generate() or
                                                 # block diffusion (block_decoding) by settings.decoding / the model
    add_sampler_args(parser, defaults={"block_length": 32})          # the sampler flags, from SamplerSettings
    settings = settings_from_args(parser.parse_args())

Fast decoding (DESIGN.md 12): `threshold` / `factor` replace the fixed n_i / k_i by parallel unmasking
(remasking.parallel_counts), and `cache` 'prefix' | 'dual' runs LLaDA-style steps over Fast-dLLM's approximate KV
caches (remedi_patches.llada_cache); a `Trajectory` counts each call's forwards (NFE), answer tokens and seconds.

`SamplerSettings` validates every value when it is built (no model needed), so a command line refuses
`--steps 64 --gen_length 32` before it loads anything; `generate()` applies the same checks (`check_schedule`).
Upstream sampling (confidence_source None) never re-masks a committed token: `remask=True` there is refused,
`remask=None` (the default) means "re-mask with a dynamic source, never in upstream mode". One denoising step
(candidates, confidence, keep / commit) is `StepRule.step`, shared with block diffusion (block_decoding.py).

Also here, because every sampling entry point (generate.py, infer_compare.py, eval_gsm_math.py, the OpenCompass and
lm-eval models) shares them:
- lengths that fit the model: `default_lengths(window, ...)` fills the lengths a CLI leaves None (its defaults)
  from the model's window (backbones.max_length_of); `PromptWindow(window, gen_length)` refuses a gen_length that
  leaves no room (one line naming --gen_length and the window) and left-crops longer prompts with ONE warning;
- the one prompt rule: `prompt_texts` / `encode_prompts(tokenizer, questions, chat, template)` (--chat auto | on |
  off means the same everywhere);
- `left_pad`, batched answers (`generate_answer_ids`) and decoding (`decode_answers`, `decode_answer`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from remedi_patches.cli import add_config_args, arg, config_from_args
from remedi_patches.data import render_prompt
from remedi_patches.confidence import CONFIDENCE_SOURCES, ConfidenceInputs, get_confidence_source
from remedi_patches.backbones import unwrap
from remedi_patches.llada_cache import CACHES, SequenceReader, check_cache
from remedi_patches.modeling_wrappers import UPSModel, has_ups_stream
from remedi_patches.remasking import (Trajectory, commit_counts, commit_schedule, commit_top_n, keep_top_k,
                                     parallel_counts, plackett_luce_keys, rank_last, remask_block)

logger = logging.getLogger(__name__)

# upstream `remasking=` rule -> the confidence source that reproduces it on masked positions only
UPSTREAM_RULES = {"low_confidence": "tps_prob", "random": "random"}
DECODINGS = ("llada", "block")  # SamplerSettings.decoding: generate() | block_decoding.block_generate()
# SamplerSettings.method: the training README's sampling methods of LLaDA-style decoding (generate's docstring)
FIXED_LENGTH, SEMI_AR_PADDING = "fixed_length", "semi_autoregressive_padding"
SEMI_AR_ORIGIN = "semi_autoregressive_origin"
METHODS = (FIXED_LENGTH, SEMI_AR_PADDING, SEMI_AR_ORIGIN)
FAST_DECODING_FIELDS = ("cache", "cache_interval", "threshold", "factor")  # SamplerSettings' fast-decoding fields
BLOCK_CFG_ERROR = ("block decoding does not implement classifier-free guidance (cfg_scale > 0): use cfg_scale 0, or "
                   "decoding 'llada'")
BLOCK_METHOD_ERROR = ("block decoding reads only the prompt and the finished blocks and stops at EOS: it is "
                      "semi_autoregressive_origin by construction; drop method (or set semi_autoregressive_origin), "
                      "or use decoding 'llada' for {method}")
BLOCK_CACHE_ERROR = ("block decoding already caches exactly (the prompt and finished blocks); cache and cache_interval "
                     "choose LLaDA-style decoding's approximate caches: drop them, or use decoding 'llada'")


# ---------------------------------------------------------------- validation (one place)


def check_schedule(steps: int, gen_length: int, block_length: int) -> int:
    """Raise a ValueError naming the problem and the fix; return the steps per block."""
    for name, value in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if min(steps, gen_length, block_length) <= 0:
        raise ValueError(f"steps, gen_length and block_length must be positive, got {steps}, {gen_length}, "
                         f"{block_length}")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not a multiple of block_length={block_length}; "
                         "pick a block_length that divides gen_length")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} is not a multiple of the number of blocks {num_blocks} "
                         f"(gen_length / block_length); use steps = a multiple of {num_blocks}")
    if steps > gen_length:
        raise ValueError(f"steps={steps} > gen_length={gen_length}: some steps would commit no token "
                         "(and steps per block would exceed block_length); use steps <= gen_length")
    return steps // num_blocks


def check_method(method: Optional[str], gen_length: int, block_length: int) -> None:
    """A sampling method's own rules: a known name, and fixed_length as one block."""
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {list(METHODS)}")
    if method == FIXED_LENGTH and block_length != gen_length:
        raise ValueError(f"method fixed_length decodes the answer as one block, but block_length={block_length} != "
                         f"gen_length={gen_length}; set block_length to gen_length, or use method "
                         f"{SEMI_AR_PADDING}")


def check_block_method(method: Optional[str]) -> None:
    """Block decoding takes method None or semi_autoregressive_origin (what it does anyway)."""
    if method not in (None, SEMI_AR_ORIGIN):
        raise ValueError(BLOCK_METHOD_ERROR.format(method=method))


def check_parallel(threshold: Optional[float], factor: Optional[float], ups_temperature: float = 0.0) -> None:
    """The parallel-decoding rules: at most one, a finite threshold, a positive factor, not with sampled rankings."""
    for name, value in (("threshold", threshold), ("factor", factor)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number or None, got {value!r}")
    if threshold is not None and factor is not None:
        raise ValueError(f"threshold={threshold} and factor={factor} are two parallel-decoding rules; give one")
    if factor is not None and factor <= 0:
        raise ValueError(f"factor must be > 0 (Fast-dLLM uses 1), got {factor}")
    if (threshold is not None or factor is not None) and ups_temperature > 0:
        raise ValueError(f"ups_temperature={ups_temperature} ranks by random Plackett-Luce keys, which a threshold or "
                         "factor cannot compare with confidences; use ups_temperature 0 with a parallel rule, or the "
                         "fixed schedule (no threshold / factor)")


def check_rules(temperature: float, cfg_scale: float, remasking: str, confidence_source: Optional[str],
                remask: Optional[bool], ups_temperature: float = 0.0) -> None:
    """The non-schedule settings: ranges, names, and remask / ups_temperature only where they mean something."""
    if temperature < 0 or cfg_scale < 0 or ups_temperature < 0:
        raise ValueError(f"temperature ({temperature}), cfg_scale ({cfg_scale}) and ups_temperature "
                         f"({ups_temperature}) must be >= 0")
    if remasking not in UPSTREAM_RULES:
        raise ValueError(f"unknown remasking {remasking!r}; use one of {sorted(UPSTREAM_RULES)}")
    if confidence_source is not None:
        get_confidence_source(confidence_source)
    elif remask:
        raise ValueError("remask=True needs a dynamic confidence_source (e.g. 'tps_prob' or 'ups'): upstream sampling "
                         "(confidence_source None) never re-masks a committed token; set a confidence_source, or "
                         "leave remask unset")
    if ups_temperature > 0 and confidence_source != "ups":
        raise ValueError(f"ups_temperature={ups_temperature} samples the ranking from the UPS confidences, but "
                         f"confidence_source is {confidence_source!r}; use confidence_source 'ups', or "
                         "ups_temperature 0")


def _check_inputs(prompt, attention_mask, mask_id, logits_eos_inf, confidence_eos_eot_inf, eos_id) -> None:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype.is_floating_point \
            or prompt.dtype == torch.bool:
        raise ValueError("prompt must be a (batch, length) integer tensor of token ids; "
                         "for one prompt pass ids[None] or tokenizer(..., return_tensors='pt').input_ids")
    if prompt.numel() == 0:
        raise ValueError(f"prompt is empty (shape {tuple(prompt.shape)}); give at least one prompt token "
                         "(a BOS token will do for unconditional generation)")
    if attention_mask is not None:
        if attention_mask.shape != prompt.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but prompt has "
                             f"{tuple(prompt.shape)}; pass the mask the tokenizer returned with the prompt")
        if (attention_mask.sum(dim=-1) == 0).any():
            raise ValueError("a row of attention_mask is all zeros, i.e. an empty prompt; drop that row")
    if (prompt == mask_id).any():
        raise ValueError(f"prompt contains the mask id {mask_id}; remove [MASK] tokens from the prompt "
                         "or pass the right mask_id for this model")
    if (logits_eos_inf or confidence_eos_eot_inf) and eos_id is None:
        raise ValueError("logits_eos_inf / confidence_eos_eot_inf need eos_id; pass the tokenizer's EOS id")


# ---------------------------------------------------------------- the algorithm


def sample_candidates(block_logits: torch.Tensor, temperature: float, seq_len: int, block: slice) -> torch.Tensor:
    """Gumbel-max token per block position: (B, N, V) -> (B, N).

    argmax(exp(logits) / (-log u) ** temperature) in float64, u ~ U(0, 1); temperature 0 is a plain
    argmax and draws nothing. u is drawn for the whole (B, L, V) sequence, as upstream does, so the
    global RNG stream (and hence the tokens for a seed) matches upstream; only the block is used.
    """
    if temperature == 0:
        return block_logits.argmax(dim=-1)
    b, _, vocab = block_logits.shape
    u = torch.rand((b, seq_len, vocab), dtype=torch.float64, device=block_logits.device)[:, block]
    return (block_logits.double().exp() / (-u.log()) ** temperature).argmax(dim=-1)


@dataclass
class StepRule:
    """One denoising step of a block, the same in LLaDA-style decoding (generate) and block diffusion
    (remedi_patches.block_decoding): candidates at masked positions, a confidence per position, then keep the
    top-k_i (re-masking) or commit the top-n_i masked positions (no re-masking). With a parallel-decoding rule
    (threshold or factor) the counts come from the confidences instead (remasking.parallel_counts). Built by
    `step_rule`."""

    source_name: str        # a confidence source (upstream rules mapped to theirs)
    remask: bool
    temperature: float      # token sampling (0 = argmax)
    ups_temperature: float  # 'ups' ranking: 0 = greedy top-k, > 0 = Plackett-Luce draw
    mask_id: int
    logits_eos_inf: bool
    confidence_eos_eot_inf: bool
    eos_id: Optional[int]
    eot_id: Optional[int]
    threshold: Optional[float] = None  # parallel decoding (remasking.parallel_counts); None with factor None:
    factor: Optional[float] = None     # the fixed schedule n_i / k_i

    @property
    def parallel(self) -> bool:
        return self.threshold is not None or self.factor is not None

    def schedule(self, block_length: int, steps_per_block: int) -> list[tuple[Optional[int], Optional[int]]]:
        """(n_i, k_i) of each step of a block: the fixed schedule, or (None, None) for each of the at most
        block_length steps of parallel decoding (the caller stops at the first step that leaves no mask)."""
        if self.parallel:
            return [(None, None)] * block_length
        return list(zip(commit_counts(block_length, steps_per_block), commit_schedule(block_length, steps_per_block)))

    def step(self, tokens: torch.Tensor, logits: torch.Tensor, ups_logits: Optional[torch.Tensor],
             n: Optional[int], k: Optional[int], seq_len: int, block: slice,
             observer=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, N) of the block, its logits (B, N, V) (EOS gating writes into them) and UPS logits (B, N) or
        None; n = n_i, k = k_i (None under a parallel rule); seq_len and block place the block in the (B, seq_len)
        row whose shape the RNG draws take (upstream's whole sequence in generate(); the block itself in block
        decoding); observer: see remasking.Trajectory.observer. Returns remasking.remask_block's (new_tokens,
        committed, remasked)."""
        if self.source_name == "ups" and ups_logits is None:
            logger.warning("confidence_source='ups' but no UPS head was given and the model returns no "
                           "UPS confidences; falling back to 'tps_prob'. Pass ups_head= (CLI: --ups_head).")
            self.source_name = "tps_prob"
        if (self.logits_eos_inf or self.confidence_eos_eot_inf) and self.eos_id >= logits.shape[-1]:
            raise ValueError(f"eos_id={self.eos_id} is outside the model's vocabulary of {logits.shape[-1]} "
                             "logits; pass the tokenizer's EOS id")
        if self.logits_eos_inf:
            logits[..., self.eos_id] = -torch.inf
        masked = tokens == self.mask_id
        candidates = torch.where(masked, sample_candidates(logits, self.temperature, seq_len, block), tokens)
        if self.source_name == "ups" and self.ups_temperature > 0:
            confidence = plackett_luce_keys(ups_logits.float(), self.ups_temperature)  # (B, N)
        else:
            source = get_confidence_source(self.source_name)
            confidence = source(ConfidenceInputs(logits, candidates, ups_logits, seq_len, block))  # (B, N)
        if self.confidence_eos_eot_inf:
            end = candidates == self.eos_id
            if self.eot_id is not None:
                end |= candidates == self.eot_id
            confidence = rank_last(confidence, end)
        if self.parallel:  # n (B,) masked positions to commit, or k (B,) block positions to keep
            held = (~masked).sum(dim=-1)
            eligible = torch.ones_like(masked) if self.remask else masked  # re-masking ranks the whole block
            passing = parallel_counts(confidence, eligible, self.threshold, self.factor)
            if self.remask:
                k = torch.maximum(passing, held + 1).clamp(max=tokens.shape[1])
            else:
                n = passing.clamp(min=1).minimum(masked.sum(dim=-1))
                k = held + n
        if observer is not None:
            observer(tokens, candidates, logits, ups_logits, confidence, k)
        if self.remask:
            keep = keep_top_k(confidence, k)
        else:
            keep = ~masked | commit_top_n(confidence, masked, n, seq_len, block.start)
        return remask_block(tokens, candidates, keep, self.mask_id)


def step_rule(model: nn.Module, *, temperature: float, remasking: str, mask_id: int, logits_eos_inf: bool,
              confidence_eos_eot_inf: bool, confidence_source: Optional[str], ups_head: Optional[nn.Module],
              remask: Optional[bool], eos_id: Optional[int], eot_id: Optional[int],
              ups_temperature: float, threshold: Optional[float] = None,
              factor: Optional[float] = None) -> tuple[nn.Module, StepRule]:
    """(the model to call, the StepRule) of a sampler's arguments: upstream rules mapped to their sources, the
    UPS head wrapped around the model when the 'ups' source needs it (UPSModel: one forward gives both)."""
    if ups_head is not None and has_ups_stream(model):
        raise ValueError(f"{type(unwrap(model)).__name__} has its own UPS stream (a dual-stream RemeDi): it gives "
                         "the UPS confidences itself, so a separate UPS head does not apply; drop ups_head "
                         "(CLI: --ups_head)")
    if confidence_source is None:
        source_name, remask = UPSTREAM_RULES[remasking], False
    else:
        source_name, remask = confidence_source, remask is not False
    if ups_head is not None and source_name == "ups":
        if isinstance(model, UPSModel):
            raise ValueError("model is already a UPSModel with its own head; do not also pass ups_head")
        model = UPSModel(model, ups_head)
    return model, StepRule(source_name, remask, temperature, ups_temperature, mask_id, logits_eos_inf,
                           confidence_eos_eot_inf, eos_id, eot_id, threshold, factor)


def fill_after_end(x: torch.Tensor, end_block: torch.Tensor, prompt_len: int, block_length: int,
                   eos_id: int) -> torch.Tensor:
    """x with EOS in every answer block after each row's EOS block (end_block (B,), -1 = none: row kept)."""
    blocks = (torch.arange(x.shape[1] - prompt_len, device=x.device) // block_length)[None, :]  # (1, G)
    after = (end_block[:, None] >= 0) & (blocks > end_block[:, None])  # (B, G)
    x[:, prompt_len:] = x[:, prompt_len:].masked_fill(after, eos_id)
    return x


def update_end_block(end_block: torch.Tensor, tokens: torch.Tensor, b: int, eos_id: int) -> torch.Tensor:
    """(B,) first block holding EOS per row (-1 = none yet) after block b's tokens (B, N) are final."""
    return torch.where((end_block < 0) & (tokens == eos_id).any(dim=-1), b, end_block)


@torch.no_grad()  # not inference_mode: callers may feed the tokens to a training forward
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128, temperature=0.,
             cfg_scale=0., remasking='low_confidence', mask_id=126336, logits_eos_inf=False,
             confidence_eos_eot_inf=False, *, confidence_source=None, ups_head=None, remask=None,
             eos_id=126081, eot_id=126348, ups_temperature=0., threshold=None, factor=None, cache=None,
             cache_interval=None, method=None, trajectory: Optional[Trajectory] = None) -> torch.Tensor:
    """Fill gen_length masked positions after `prompt` by masked-diffusion denoising (LLaDA-style: every step
    runs the whole sequence, or part of it over an approximate KV cache; block diffusion with an exact KV cache is
    remedi_patches.block_decoding.block_generate).

    Args:
        model: mask predictor; model(x, attention_mask=am) returns logits (B, L, V), an object with
            .logits, or an output with .logits and .confidences (UPS logits: UPSModel, dual-stream RemeDi).
        prompt: (B, Lp) token ids, left-padded when B > 1; attention_mask: (B, Lp) of 1/0 or None.
        steps, gen_length, block_length: gen_length // block_length blocks, steps // num_blocks steps
            each; per step a block of B masks commits n_i tokens (even split, remainder early).
        temperature: Gumbel-max sampling temperature in float64 (0 = argmax).
        cfg_scale: classifier-free guidance; the unconditional copy masks the prompt and
            logits = un + (cfg_scale + 1) * (cond - un). Works with and without attention_mask.
        remasking: upstream rule used when confidence_source is None: 'low_confidence' ranks masked
            positions by the probability of their candidate, 'random' by uniform noise.
        logits_eos_inf: EOS logit set to -inf before sampling (EOS is never a candidate).
        confidence_eos_eot_inf: positions whose candidate is EOS or EoT rank after every other
            candidate of the block (in every mode, at every temperature): they are committed only
            when nothing else is left to commit that step. Their confidences are shifted below the
            others rather than set to -inf, so top-k never reaches positions it must not choose.
            (Upstream sets the EOS logit to -inf in the Gumbel-noised copy, which is the logits
            tensor itself only at temperature 0, so its EOS gating is lost at temperature > 0.)
        confidence_source: None = upstream; else a name in remedi_patches.confidence.CONFIDENCE_SOURCES
            ('ups', 'tps_prob', 'tps_logit', 'random', 'margin', 'entropy'): per step keep the top-k_i
            positions of the block by that confidence (k_i = n_1 + ... + n_i) and re-mask the others.
            'ups' with no head and a model giving no .confidences logs a warning and uses 'tps_prob'.
        ups_head: UPSHead module on the model's last hidden state (used by 'ups' only, on its device);
            refused for a model with its own UPS stream (has_ups_stream).
        remask: None (default) = re-mask with a dynamic source, never in upstream mode. False restricts
            the choice to masked positions (committed tokens stay), so 'tps_prob' equals upstream
            'low_confidence'. True with confidence_source None is refused (ValueError): upstream
            sampling has no re-masking.
        eos_id, eot_id: ids gated by the two flags above (eot_id may be None).
        ups_temperature: with confidence_source 'ups': 0 ranks greedily; > 0 draws the kept positions
            from softmax(UPS logits / ups_temperature) without replacement (Plackett-Luce, as RemeDi's RL
            sampler; remasking.plackett_luce_keys), among the masked ones when remask=False.
        threshold, factor: parallel decoding (Fast-dLLM; at most one): instead of n_i per step, commit every
            masked position of the block whose confidence is >= threshold (in the source's scale: a probability
            for 'tps_prob' / 'ups'), or under `factor` the longest run of the sorted confidences whose n-th reaches
            1 - factor / (n + 1); at least one per step, so a block takes 1 to block_length steps and `steps`
            only has to pass the schedule checks. With re-masking the rule counts over the whole block and the
            block keeps the top max(count, held + 1) positions (module docstring of remedi_patches.remasking).
        cache, cache_interval: None = every step one forward of the whole sequence (exact); 'prefix' / 'dual' =
            Fast-dLLM's approximate KV caches, refreshed by a whole-sequence forward at the block's first step and
            every cache_interval steps of it (None = once per block); see remedi_patches.llada_cache. Need a model
            taking the cache arguments (native LLaDA, SMDM, dual-stream RemeDi).
        method: the sampling methods of LLaDA's training README. None or 'semi_autoregressive_padding' (upstream):
            the whole answer of masks follows the prompt from the start and its blocks are filled left to right;
            'fixed_length': the same with the answer as one block (block_length must equal gen_length);
            'semi_autoregressive_origin': the answer grows a block at a time: the model reads only the prompt and
            the blocks so far (no masks beyond the current block), and growth stops after the block in which every
            row has written eos_id; the blocks never written are returned as EOS. When no row writes EOS before
            the last block it equals generating each block in turn as a one-block call on the text so far.
        trajectory: a remedi_patches.remasking.Trajectory to append one StepRecord per step to (and count
            the forwards, answer tokens and seconds in). Its token snapshots always have the full
            (B, Lp + gen_length) shape (blocks not yet grown read as masks).
    Returns:
        (B, Lp + gen_length) token ids; the prompt is returned unchanged and no mask is left.
    Same model, inputs and seed as upstream LLaDA give the same tokens (global torch RNG, same order).
    """
    started = time.perf_counter()
    _check_inputs(prompt, attention_mask, mask_id, logits_eos_inf, confidence_eos_eot_inf, eos_id)
    steps_per_block = check_schedule(steps, gen_length, block_length)
    check_rules(temperature, cfg_scale, remasking, confidence_source, remask, ups_temperature)
    check_parallel(threshold, factor, ups_temperature)
    check_cache(cache, cache_interval)
    check_method(method, gen_length, block_length)
    if method == SEMI_AR_ORIGIN and eos_id is None:
        raise ValueError(f"method {SEMI_AR_ORIGIN} stops growing the answer at EOS and needs eos_id; pass the "
                         "tokenizer's EOS id")
    model, rule = step_rule(model, temperature=temperature, remasking=remasking, mask_id=mask_id,
                            logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
                            confidence_source=confidence_source, ups_head=ups_head, remask=remask, eos_id=eos_id,
                            eot_id=eot_id, ups_temperature=ups_temperature, threshold=threshold, factor=factor)

    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt
    uncond_positions = x != mask_id  # (B, L) the prompt, padding included
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=1)
        if cfg_scale > 0:
            attention_mask = torch.cat([attention_mask, attention_mask])
    origin = method == SEMI_AR_ORIGIN
    end_block = torch.full((batch,), -1, dtype=torch.long, device=prompt.device)  # origin: first block with EOS
    forwards = 0

    for b in range(gen_length // block_length):
        block = slice(prompt_len + b * block_length, prompt_len + (b + 1) * block_length)
        seen = block.stop if origin else x.shape[1]  # origin: the model reads the prompt and the blocks so far
        if b == 0 or origin:
            reader = SequenceReader(model, None if attention_mask is None else attention_mask[:, :seen], cache,
                                    cache_interval, cfg_scale, uncond_positions[:, :seen], mask_id)
        for i, (n, k) in enumerate(rule.schedule(block_length, steps_per_block)):  # n_i, k_i (None: parallel)
            logits, ups_logits = reader.read(x[:, :seen], block, i)  # (B, N, V), (B, N) | None
            new_tokens, committed, remasked = rule.step(x[:, block], logits, ups_logits, n, k, seen, block,
                                                        None if trajectory is None else trajectory.observer)
            x[:, block] = new_tokens
            left = (new_tokens == mask_id).sum(dim=-1)  # (B,)
            if trajectory is not None:
                trajectory.record(b, i, block.start, committed, remasked, left, x)
            if rule.parallel and not bool(left.any()):
                break
        if origin:
            forwards += reader.forwards
            end_block = update_end_block(end_block, x[:, block], b, eos_id)
            if bool((end_block >= 0).all()):
                break
    if origin:
        x = fill_after_end(x, end_block, prompt_len, block_length, eos_id)
    else:
        forwards = reader.forwards
    if trajectory is not None:
        trajectory.add_call(x[:, prompt_len:], forwards, started)
    return x


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class SamplerSettings:
    """What a caller chooses about sampling (the model bundle supplies mask / EOS / EoT ids and the UPS head).

    Every value is checked when the settings are built (ValueError naming the problem and the fix), so a
    command line can refuse bad flags before it loads a model. Defaults are generate()'s.
    """

    steps: int = arg(128, "denoising steps in all, a multiple of the block count (gen_length / block_length); "
                     "CLI default None = gen_length (one token per step)")
    gen_length: int = arg(128, "answer tokens sampled per prompt; CLI default None = from the model's window W: "
                          "min(128, W // 4), a multiple of 32 when >= 32 (128 when W is unknown)")
    block_length: int = arg(128, "semi-autoregressive block size; divides gen_length; CLI default None = 32, or "
                            "gen_length when 32 does not divide it")
    temperature: float = arg(0.0, "Gumbel-max sampling temperature (0 = argmax)")
    cfg_scale: float = arg(0.0, "classifier-free guidance scale (0 = off)")
    remasking: str = arg("low_confidence", "upstream rule, used when no confidence source is given",
                         choices=sorted(UPSTREAM_RULES))
    logits_eos_inf: bool = arg(False, "never sample EOS")
    confidence_eos_eot_inf: bool = arg(False, "commit EOS / EoT candidates after all other candidates of a block")
    confidence_source: Optional[str] = arg(
        None, f"RemeDi dynamic remasking by this confidence (one of {sorted(CONFIDENCE_SOURCES)}, or a source "
        "registered with remedi_patches.confidence.register); None = upstream LLaDA sampling", metavar="SOURCE")
    remask: Optional[bool] = arg(
        None, "never re-mask committed tokens (ranking only); without it dynamic sources re-mask and upstream "
        "sampling never does", flags=("--no_remask",))
    ups_temperature: float = arg(
        0.0, "with confidence source 'ups': 0 = keep the top-k_i positions by UPS confidence; > 0 = draw them from "
        "softmax(confidences / ups_temperature) without replacement (Plackett-Luce; RemeDi's RL sampler uses 1.2)")
    decoding: Optional[str] = arg(
        None, "llada = every step runs the whole sequence (LLaDA's sampler); block = block diffusion: the prompt and "
        "finished blocks in a KV cache, one block of masks at a time, stopping after the block where every row has "
        "written EOS; None = by the model: block for a model with its own UPS stream (dual-stream RemeDi), else "
        "llada", choices=DECODINGS)
    threshold: Optional[float] = arg(
        None, "parallel decoding (Fast-dLLM): per step commit every masked position of the block whose confidence "
        "is >= this (a probability for tps_prob / ups; Fast-dLLM uses 0.9), at least one; a block then takes 1 to "
        "block_length steps and --steps only has to pass its checks. With re-masking the block keeps its top "
        "max(count over the whole block, held + 1) positions. None = the fixed schedule", metavar="CONF")
    factor: Optional[float] = arg(
        None, "parallel decoding, Fast-dLLM's factor rule: the n-th most confident masked position is committed "
        "when its confidence is >= 1 - factor / (n + 1) (and all before it were); at least one per step. "
        "Exclusive with --threshold", metavar="F")
    cache: Optional[str] = arg(
        None, "LLaDA-style decoding's approximate KV cache (Fast-dLLM): prefix = later steps of a block feed the "
        "block and the suffix over the cached prefix; dual = they feed the block alone over the cached prefix and "
        "suffix; refreshed by one whole-sequence forward per block. None = exact (every step the whole sequence)",
        choices=CACHES)
    cache_interval: Optional[int] = arg(
        None, "with --cache: also refresh every this many steps within a block (1 = every step: exact); None = "
        "once per block, as Fast-dLLM", metavar="STEPS")
    method: Optional[str] = arg(
        None, "LLaDA's sampling methods: semi_autoregressive_padding = the whole answer of masks follows the prompt "
        "and its blocks fill left to right (upstream; what None means under decoding llada); fixed_length = the "
        "same as one block (block_length = gen_length; the CLI default when --block_length is left out); "
        "semi_autoregressive_origin = the answer grows a block at a time, the model reading only the prompt and "
        "the blocks so far, until every row has written EOS (block decoding works so by construction)",
        choices=METHODS)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise a ValueError naming the first bad value and its fix (also run when the settings are built)."""
        for name in ("temperature", "cfg_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        for name in ("logits_eos_inf", "confidence_eos_eot_inf"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.remask is not None and not isinstance(self.remask, bool):
            raise ValueError(f"remask must be True, False or None, got {self.remask!r}")
        if isinstance(self.ups_temperature, bool) or not isinstance(self.ups_temperature, (int, float)):
            raise ValueError(f"ups_temperature must be a number, got {self.ups_temperature!r}")
        if self.decoding not in (None, *DECODINGS):
            raise ValueError(f"unknown decoding {self.decoding!r}; use one of {list(DECODINGS)} or None (by the model)")
        check_schedule(self.steps, self.gen_length, self.block_length)
        check_rules(self.temperature, self.cfg_scale, self.remasking, self.confidence_source, self.remask,
                    self.ups_temperature)
        if self.decoding == "block" and self.cfg_scale > 0:
            raise ValueError(BLOCK_CFG_ERROR)
        check_parallel(self.threshold, self.factor, self.ups_temperature)
        check_cache(self.cache, self.cache_interval)
        if self.decoding == "block" and self.cache is not None:
            raise ValueError(BLOCK_CACHE_ERROR)
        check_method(self.method, self.gen_length, self.block_length)
        if self.decoding == "block":
            check_block_method(self.method)

    @property
    def remasks(self) -> bool:
        """Whether committed tokens may be re-masked under these settings."""
        return self.confidence_source is not None and self.remask is not False

    def replace(self, **changes) -> "SamplerSettings":
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def generate_kwargs(self) -> dict:
        """The settings as keyword arguments of generate() and block_decoding.block_generate (all but decoding,
        which chooses between them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "decoding"}


def add_sampler_args(parser: argparse.ArgumentParser, defaults: Optional[dict] = None, exclude: Sequence[str] = (),
                     group: str = "sampler") -> argparse.ArgumentParser:
    """Add one flag per SamplerSettings field (--steps ... --confidence_source --no_remask) to `parser`.

    defaults: per-CLI defaults (e.g. generate.py's block_length 32, the evaluators' embedded-task 32/32/32);
    exclude: fields a CLI sets otherwise (the evaluators compare several --confidence_sources).
    """
    return add_config_args(parser, SamplerSettings, group=group, exclude=exclude, defaults=defaults)


def settings_from_args(namespace: argparse.Namespace, window: Optional[int] = None, **overrides) -> SamplerSettings:
    """SamplerSettings from parsed flags (ValueError on a bad value); `eos_gating` turns both EOS flags on.

    Lengths left None (the sampling CLIs' defaults) come from `default_lengths(window, ...)`; explicit values are
    kept exactly. A CLI calls this once before loading the model (window None: every flag checked early) and again
    with the loaded model's window (`backbones.max_length_of`).
    """
    if getattr(namespace, "eos_gating", False):
        overrides.setdefault("logits_eos_inf", True)
        overrides.setdefault("confidence_eos_eot_inf", True)
    given = {name: overrides.get(name, getattr(namespace, name, None)) for name in LENGTH_FIELDS}
    defaulted = [name for name, value in given.items() if value is None]
    if defaulted:
        overrides.update(default_lengths(window, **given))
        if "block_length" in defaulted and overrides.get("method", getattr(namespace, "method", None)) == FIXED_LENGTH:
            overrides["block_length"] = overrides["gen_length"]  # one block: the whole answer
    try:
        return config_from_args(SamplerSettings, namespace, **overrides)
    except ValueError as err:
        defaulted = [name for name in defaulted if f"{name}=" in str(err)]
        if not defaulted:
            raise
        chosen = ", ".join(f"{name} {overrides[name]}" for name in defaulted)
        where = "an unlimited window" if window is None else f"the model's window of {window} tokens"
        raise ValueError(f"{err} ({chosen} by default for {where}; pass "
                         f"{' '.join('--' + n for n in defaulted)} too)") from None


def check_sampler_args(namespace: argparse.Namespace, **overrides) -> None:
    """Every sampler flag checked before a model is loaded. Once --gen_length is given the schedule does not depend
    on the model (the other lengths default from it), so it is checked whole; without it, the explicit lengths are
    checked alone and the schedule when the model's window is known (settings_from_args)."""
    given = {name: overrides.get(name, getattr(namespace, name, None)) for name in LENGTH_FIELDS}
    if given["gen_length"] is not None:
        settings_from_args(namespace, **overrides)
        return
    for name, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"--{name} must be positive (an integer), got {value!r}")
    settings_from_args(namespace, **{**overrides, "steps": 1, "gen_length": 1, "block_length": 1})


# ---------------------------------------------------------------- lengths that fit the model's window

LENGTH_FIELDS = ("steps", "gen_length", "block_length")
LENGTH_DEFAULTS = {name: None for name in LENGTH_FIELDS}  # the sampling CLIs' defaults: "from the model"
DEFAULT_GEN_LENGTH, DEFAULT_BLOCK = 128, 32


def default_lengths(window: Optional[int], steps: Optional[int] = None, gen_length: Optional[int] = None,
                    block_length: Optional[int] = None) -> dict:
    """{steps, gen_length, block_length}: the given values kept exactly, the None ones from the model's window.

    gen_length = min(128, window // 4) (128 when the window is unknown; 3/4 of the window stay for the prompt),
    rounded down to a multiple of block_length (given, else 32) when at least one block fits; block_length = 32,
    or gen_length itself when 32 does not divide it; steps = gen_length (one token per step). The result is
    checked by SamplerSettings. The embedded model (window 128): 32 / 32 / 32; LLaDA-8B (4096): 128 / 128 / 32.
    """
    if gen_length is None:
        gen_length = DEFAULT_GEN_LENGTH if window is None else max(1, min(DEFAULT_GEN_LENGTH, window // 4))
        unit = block_length if isinstance(block_length, int) and block_length > 0 else DEFAULT_BLOCK
        if gen_length >= unit:
            gen_length -= gen_length % unit
    if block_length is None:
        block_length = DEFAULT_BLOCK if isinstance(gen_length, int) and gen_length % DEFAULT_BLOCK == 0 else gen_length
    if steps is None:
        steps = gen_length
    return {"steps": steps, "gen_length": gen_length, "block_length": block_length}


def check_fits(gen_length: int, window: Optional[int], flag: str = "--gen_length") -> Optional[int]:
    """Tokens left for the prompt in a window of `window` tokens (None = unlimited) after `gen_length` answer
    tokens; a ValueError naming `flag` and the window when the answer alone does not leave one prompt token."""
    if window is None:
        return None
    if gen_length >= window:
        raise ValueError(f"{flag} {gen_length} does not fit the model's window of {window} tokens (the prompt needs at "
                         f"least one); use {flag} {max(1, window // 2)} or less")
    return window - gen_length


class PromptWindow:
    """The one cropping rule of every sampling entry point: prompts longer than the room the window leaves after
    gen_length answer tokens keep their last tokens (the question sits at the end of few-shot prompts), with ONE
    warning per PromptWindow (per run) naming how many prompts were cropped and by how much.

        fit = PromptWindow(max_length_of(model), settings.gen_length)   # ValueError when gen_length alone is too long
        fit.report(lengths)                  # optional: warn once about every prompt of the run up front
        ids, mask = fit.crop_batch(ids, mask)     # left-padded tensors   |   fit.crop(list_of_token_lists)
    """

    def __init__(self, window: Optional[int], gen_length: int, flag: str = "--gen_length"):
        self.window, self.gen_length, self.flag = window, gen_length, flag
        self.room = check_fits(gen_length, window, flag)
        self.warned = False

    def report(self, lengths: Sequence[int]) -> None:
        """Warn (once) about the prompts of these lengths that will be cropped; later crops stay silent."""
        if self.warned or self.room is None:
            return
        cuts = [n - self.room for n in lengths if n > self.room]
        if cuts:
            self.warned = True
            by = str(max(cuts)) if min(cuts) == max(cuts) else f"{min(cuts)} to {max(cuts)}"
            logger.warning("%d of %d prompts are longer than the %d tokens the model's window of %d leaves after "
                           "%s %d: cropped to their last %d tokens (cut by %s tokens); lower %s to keep more of "
                           "the prompt", len(cuts), len(lengths), self.room, self.window, self.flag, self.gen_length,
                           self.room, by, self.flag)

    def crop(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Token-id prompts, each cut to its last `room` tokens."""
        self.report([len(p) for p in prompts])
        if self.room is None:
            return [list(p) for p in prompts]
        return [list(p)[-self.room:] for p in prompts]

    def crop_batch(self, ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Left-padded (ids, mask) cut to the last `room` columns (mask None when no padding is left)."""
        if self.room is None or ids.shape[1] <= self.room:
            return ids, attention_mask
        lengths = attention_mask.sum(dim=1).tolist() if attention_mask is not None else [ids.shape[1]] * len(ids)
        self.report(lengths)
        ids = ids[:, -self.room:]
        if attention_mask is not None:
            attention_mask = attention_mask[:, -self.room:]
            attention_mask = None if bool(attention_mask.all()) else attention_mask
        return ids, attention_mask


def harness_budget(model_window: Optional[int], max_len: Optional[int]) -> Optional[int]:
    """Tokens an evaluation-harness model may use: its own budget `max_len` (OpenCompass max_seq_len, lm-eval
    max_length) capped by the model's window (either may be None = unlimited)."""
    budgets = [n for n in (model_window, max_len) if n is not None]
    return min(budgets) if budgets else None


def harness_window(cached: Optional[PromptWindow], model_window: Optional[int], max_len: int,
                   gen_length: int) -> PromptWindow:
    """The PromptWindow of an evaluation-harness model for its budget (`harness_budget`); `cached` is kept while
    the budget and gen_length are unchanged, so the crop warning comes once per model. Made at the first
    generation: likelihood-only runs never need it."""
    budget = harness_budget(model_window, max_len)
    if cached is not None and (cached.window, cached.gen_length) == (budget, gen_length):
        return cached
    return PromptWindow(budget, gen_length, flag="gen_length")


def harness_settings(fields: dict, model_window: Optional[int] = None, max_len: Optional[int] = None,
                     early: bool = False) -> Optional[SamplerSettings]:
    """SamplerSettings of an evaluation-harness model config (`fields` named as SamplerSettings' fields), with the
    rule of the sampling CLIs: lengths left None come from the harness budget (`harness_budget`) as
    `default_lengths` says. With `early` (before the model is loaded) every value is only checked (None returned)."""
    namespace = argparse.Namespace(**fields)
    if early:
        check_sampler_args(namespace)
        return None
    return settings_from_args(namespace, harness_budget(model_window, max_len))


# ---------------------------------------------------------------- the model bundle


def decoding_of(model: nn.Module, decoding: Optional[str] = None) -> str:
    """The decoding a sampler call uses: `decoding` when given, else 'block' for a model with its own UPS stream
    (the regime the dual-stream RemeDi is trained in) and 'llada' for every other model."""
    if decoding is not None:
        return decoding
    return "block" if has_ups_stream(model) else "llada"


def check_decoding(model: nn.Module, settings: SamplerSettings) -> None:
    """Settings that only the model can refuse: an approximate cache on a model that decodes by blocks by default
    (the harness adapters check it when the model is loaded; sample() at every call)."""
    if decoding_of(model, settings.decoding) == "block" and settings.cache is not None:
        raise ValueError(f"{BLOCK_CACHE_ERROR} (this model decodes by blocks by default: it has its own UPS stream)")
    if decoding_of(model, settings.decoding) == "block" and settings.method not in (None, SEMI_AR_ORIGIN):
        raise ValueError(f"{BLOCK_METHOD_ERROR.format(method=settings.method)} (this model decodes by blocks by "
                         "default: it has its own UPS stream)")


def sample(bundle, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], settings: SamplerSettings,
           trajectory: Optional[Trajectory] = None) -> torch.Tensor:
    """One sampler call with `settings` on a loaded model bundle -> (B, Lp + gen_length) token ids on the bundle's
    device: generate() (decoding 'llada') or block_decoding.block_generate() (decoding 'block'), chosen by
    `decoding_of(bundle.model, settings.decoding)`.

    bundle: a remedi_patches.backbones.EvalModel (model, ups_head, mask_id, eos_id, eot_id, device).
    input_ids (B, Lp), left-padded; attention_mask (B, Lp) of 1/0, or None when no row is padded.
    """
    from remedi_patches.block_decoding import block_generate  # it builds on this module

    if not isinstance(settings, SamplerSettings):
        raise TypeError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
    input_ids = input_ids.to(bundle.device)
    attention_mask = None if attention_mask is None else attention_mask.to(bundle.device)
    check_decoding(bundle.model, settings)
    decode = block_generate if decoding_of(bundle.model, settings.decoding) == "block" else generate
    return decode(bundle.model, input_ids, attention_mask, mask_id=bundle.mask_id, ups_head=bundle.ups_head,
                  eos_id=bundle.eos_id, eot_id=bundle.eot_id, trajectory=trajectory, **settings.generate_kwargs())


def needs_ups_head(bundle, settings: SamplerSettings) -> bool:
    """True when `settings` ask for the UPS but the bundle has none (the sampler would fall back to tps_prob)."""
    return (settings.confidence_source == "ups" and bundle.ups_head is None and not isinstance(bundle.model, UPSModel)
            and not has_ups_stream(bundle.model))


# ---------------------------------------------------------------- prompts in, answers out (CLIs and harnesses)


CHAT_CHOICES = ("auto", "on", "off")
CHAT_HELP = ("how a prompt becomes model input (the same in every entry point): auto = the tokenizer's chat template "
             "when it has one, else the plain prompt rule ('Question: ...\\nAnswer:', or --prompt_template); on = "
             "the chat template (an error when the tokenizer has none); off = the plain prompt rule")
TEMPLATE_HELP = ("plain prompt with a {question} placeholder; None = 'Question: {question}\\nAnswer:' (the embedded "
                 "task's format); '{question}' = the prompt as written. With a chat template it shapes the user turn")


def uses_chat(tokenizer, chat: str) -> bool:
    """Whether `chat` (auto, on, off) applies the tokenizer's chat template (ValueError for on without one)."""
    if chat not in CHAT_CHOICES:
        raise ValueError(f"unknown --chat {chat!r}; use one of {list(CHAT_CHOICES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise ValueError("--chat on, but the tokenizer has no chat template; use --chat auto or off (the plain "
                         "'Question: ...\\nAnswer:' prompt)")
    return chat == "on" or (chat == "auto" and has_template)


def prompt_texts(tokenizer, questions: Sequence[str], chat: str = "auto", template: Optional[str] = None
                 ) -> tuple[list[str], bool]:
    """The project's ONE prompt rule -> (model-input texts, whether the chat template was applied).

    Chat template (chat 'on', or 'auto' when the tokenizer has one): one user turn holding the question (rendered
    by `template` when one is given). Otherwise remedi_patches.data.render_prompt(question, template): by default
    the embedded task's "Question: ...\nAnswer:".
    """
    if uses_chat(tokenizer, chat):
        turns = [q if template is None else render_prompt(q, template) for q in questions]
        return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                              tokenize=False) for t in turns], True
    return [render_prompt(q, template) for q in questions], False


def encode_texts(tokenizer, texts: Sequence[str], chat_applied: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-input texts -> left-padded (ids, attention_mask); the tokenizer's special tokens unless the chat
    template already holds them."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(texts), padding=True, return_tensors="pt", add_special_tokens=not chat_applied)
    return enc["input_ids"], enc["attention_mask"]


def encode_prompts(tokenizer, questions: Sequence[str], chat: str = "auto", template: Optional[str] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """User prompts -> left-padded (ids, attention_mask) by the one prompt rule (prompt_texts)."""
    texts, chat_applied = prompt_texts(tokenizer, questions, chat, template)
    return encode_texts(tokenizer, texts, chat_applied)


def cut_at_stop(row: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens of `row` before its first stop id (EOS / EoT)."""
    row = list(row)
    return row[:next((j for j, t in enumerate(row) if t in stop_ids), len(row))]


def decode_answers(tokenizer, out: torch.Tensor, prompt_len: int, stop_ids: Sequence[int]) -> list[str]:
    """Answer part of each row, cut at the first stop token (EOS / EoT), without special tokens."""
    return [tokenizer.decode(cut_at_stop(row, stop_ids), skip_special_tokens=True)
            for row in out[:, prompt_len:].tolist()]


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


def generate_answer_ids(bundle, prompts: Sequence[Sequence[int]], settings: SamplerSettings,
                        micro_batch: int = 1, trajectory: Optional[Trajectory] = None) -> list[list[int]]:
    """Sample an answer for each token-id prompt, micro_batch prompts per sample() call (left-padded with the
    bundle's pad_id); each answer is cut before its first EOS / EoT token. `trajectory` sums the calls' cost
    (NFE, tokens/s)."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    answers = []
    for start in range(0, len(prompts), micro_batch):
        ids, attention_mask = left_pad(prompts[start:start + micro_batch], bundle.pad_id)
        out = sample(bundle, ids, attention_mask, settings, trajectory)  # (b, Lp + gen_length)
        answers += [cut_at_stop(row, bundle.stop_ids) for row in out[:, ids.shape[1]:].tolist()]
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


def optional_number(key: str, value, kind: type = float, where: str = "") -> Optional[float | int]:
    """A numeric config value (a number, or a string from a harness's command line) as `kind` (float or int); None
    for None, '' and 'none'; a one-line ValueError naming the key (and `where` it was given) for anything else."""
    text = optional_value(value)
    if text is None:
        return None
    if not isinstance(value, bool):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'} or none, got {value!r}{where}")


def optional_value(value) -> Optional[str]:
    """Config values meaning "none given" (None, '' and 'none' from command-line strings) -> None, else str."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return str(value)
