"""Block-diffusion decoding (DESIGN.md 10): the regime the paper's RemeDi is trained in, with a KV cache.

    out = block_generate(model, prompt, attention_mask, steps=32, gen_length=128, block_length=32,
                         confidence_source="ups", mask_id=..., eos_id=...)        # (B, Lp + gen_length)
    out = block_generate(..., kv_cache=False)  # the reference: no cache, the same tokens (tests compare them)
    sample(bundle, ids, am, SamplerSettings(..., decoding="block"))      # the same through remedi_patches.sampling

The prompt is encoded once into a `KVCache` (remedi_patches.kv_cache). Then, block after block, `block_length`
masks are denoised in steps / (gen_length / block_length) steps: each step one forward of the block alone, which
attends to the cache (prompt + finished blocks) and to itself, then one `StepRule.step` (the k_i schedule of
remasking.commit_schedule, remainder early as LLaDA; candidates by argmax or temperature sampling; ranking by the
confidence source, `ups_temperature` > 0 = Plackett-Luce draws from the UPS; or a parallel-decoding rule,
`threshold` / `factor`, as in generate). A finished block is appended to the cache by one more forward with
use_cache=True. This cache is exact, so LLaDA-style decoding's approximate `cache` settings do not apply here. A
model decoding by blocks implements the forward contract of kv_cache (position_ids, past_key_values, use_cache, 2-D
or 4-D attention_mask).

`kv_cache=False` recomputes the prompt, the finished blocks and the current block at every step, with the
block-causal mask the model is trained with (prompt -> prompt; block j -> prompt + blocks <= j; padding never
attended). Every cached key is what that forward computes at its position, so both paths give the same tokens
(up to float rounding), drawing the RNG in the same order.

Left-padded batches: pads are never attended; positions count from each row's first real token (a row's
block b starts at position real_len + b * block_length). Generation stops after the first block in which every
row has written EOS: rows that ended earlier get EOS after their EOS block, and the blocks never decoded are EOS,
so the output keeps its shape (B, Lp + gen_length). NFE (forwards) is counted in the Trajectory.

Differences from the official RemeDi inference (reference/remedi_official.md C, F): the UPS ranks by default
when asked ('ups'; the official code ranks by the TPS logit, offered as 'tps_logit'); the k_i remainder goes to
the earliest steps (no precedence bug); EOS stops decoding; pads are never attended; one cache class.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from remedi_patches.kv_cache import KVCache, prompt_positions
from remedi_patches.llada_cache import CACHE_ARGS, takes_cache
from remedi_patches.modeling_wrappers import logits_of
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import (BLOCK_CACHE_ERROR, BLOCK_CFG_ERROR, _check_inputs, check_block_method,
                                     check_parallel, check_rules, check_schedule, fill_after_end, step_rule,
                                     update_end_block)


def block_causal_mask(key_real: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True = attend: a query of group g sees the real keys of groups <= g.

    key_real (B, L) bool: not padding; group (L,) long: 0 for the prompt, j + 1 for block j."""
    return (key_real[:, None, :] & (group[None, :] <= group[:, None]))[:, None]  # (B, 1, L, L)


class BlockContext:
    """What the block being denoised attends to: the prompt and the finished blocks.

    kv_cache=True: kept as keys/values in a KVCache (the prompt is written by the constructor's forward).
    kv_cache=False: kept as tokens and recomputed at every forward with block_causal_mask (the reference).
    `forwards` counts the model calls (NFE)."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 kv_cache: bool) -> None:
        batch, length = prompt.shape
        self.model, self.forwards = model, 0
        positions, self.real_len = prompt_positions(attention_mask, batch, length, prompt.device)
        self.cache = KVCache() if kv_cache else None
        if self.cache is not None:
            self._forward(prompt, attention_mask=attention_mask, position_ids=positions,
                          past_key_values=self.cache, use_cache=True)
            return
        real = torch.ones_like(prompt, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.ids, self.positions, self.real = prompt, positions, real  # (B, Lc) each
        self.group = torch.zeros(length, dtype=torch.long, device=prompt.device)  # (Lc,) 0 = prompt, j + 1 = block j
        self.next_group = 1

    def _forward(self, ids: torch.Tensor, **kwargs):
        self.forwards += 1
        return self.model(ids, **kwargs)

    def block_positions(self, index: int, block_length: int) -> torch.Tensor:
        """(B, N) positions of block `index`: right after each row's real prompt tokens."""
        offsets = torch.arange(block_length, device=self.real_len.device) + index * block_length
        return self.real_len[:, None] + offsets[None, :]

    def _joined(self, block: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ids, positions, real, group) of the kept tokens followed by `block` as the next group (no cache)."""
        group = self.group.new_full((block.shape[1],), self.next_group)
        return (torch.cat([self.ids, block], dim=1), torch.cat([self.positions, positions], dim=1),
                torch.cat([self.real, torch.ones_like(block, dtype=torch.bool)], dim=1), torch.cat([self.group, group]))

    def read(self, block: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One forward of the block (B, N) -> (TPS logits (B, N, V), UPS logits (B, N) or None)."""
        if self.cache is not None:
            output = self._forward(block, position_ids=positions, past_key_values=self.cache)
            return logits_of(output), getattr(output, "confidences", None)
        ids, positions, real, group = self._joined(block, positions)
        output = self._forward(ids, attention_mask=block_causal_mask(real, group), position_ids=positions)
        n = block.shape[1]
        ups = getattr(output, "confidences", None)
        return logits_of(output)[:, -n:], None if ups is None else ups[:, -n:]

    def append(self, block: torch.Tensor, positions: torch.Tensor) -> None:
        """Add a finished block (B, N): one cache-writing forward, or kept for the recomputing forwards."""
        if self.cache is not None:
            self._forward(block, position_ids=positions, past_key_values=self.cache, use_cache=True)
            return
        self.ids, self.positions, self.real, self.group = self._joined(block, positions)
        self.next_group += 1


@torch.no_grad()
def block_generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=32, temperature=0.,
                   cfg_scale=0., remasking='low_confidence', mask_id=126336, logits_eos_inf=False,
                   confidence_eos_eot_inf=False, *, confidence_source=None, ups_head=None, remask=None,
                   eos_id=126081, eot_id=126348, ups_temperature=0., threshold=None, factor=None, cache=None,
                   cache_interval=None, method=None, trajectory: Optional[Trajectory] = None, kv_cache: bool = True
                   ) -> torch.Tensor:
    """Fill gen_length masked positions after `prompt` by block diffusion (module docstring).

    The arguments mean what they mean in remedi_patches.sampling.generate (same names, same checks; one
    SamplerSettings serves both), except:
        model: implements the cache contract of remedi_patches.kv_cache (a dual-stream RemeDi, native LLaDA, the
            SMDM TransEncoder, or any of them under a UPS head via ups_head=).
        cfg_scale: must be 0 (classifier-free guidance is not implemented for block decoding).
        eos_id: stops decoding after the first block in which every row has written it (None: no stop).
        cache, cache_interval: must be None (the approximate caches of LLaDA-style decoding; this one is exact).
        method: None or 'semi_autoregressive_origin', which block decoding is by construction (each block reads only
            the prompt and the blocks before it, and EOS stops it); the other methods are refused.
        kv_cache: False = recompute prompt + finished blocks every step with the block-causal mask (reference).
        trajectory: one StepRecord per step (`start` = the block's first position in the output), the forwards
            run, answer tokens and seconds, as generate() records them.
    Returns (B, Lp + gen_length) token ids: the prompt unchanged, no mask left.
    """
    started = time.perf_counter()
    _check_inputs(prompt, attention_mask, mask_id, logits_eos_inf, confidence_eos_eot_inf, eos_id)
    steps_per_block = check_schedule(steps, gen_length, block_length)
    check_rules(temperature, cfg_scale, remasking, confidence_source, remask, ups_temperature)
    check_parallel(threshold, factor, ups_temperature)
    if cfg_scale > 0:
        raise ValueError(BLOCK_CFG_ERROR)
    if cache is not None or cache_interval is not None:
        raise ValueError(BLOCK_CACHE_ERROR)
    check_block_method(method)
    model, rule = step_rule(model, temperature=temperature, remasking=remasking, mask_id=mask_id,
                            logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
                            confidence_source=confidence_source, ups_head=ups_head, remask=remask, eos_id=eos_id,
                            eot_id=eot_id, ups_temperature=ups_temperature, threshold=threshold, factor=factor)
    if not takes_cache(model):
        raise ValueError(f"block decoding needs a model whose forward takes {', '.join(CACHE_ARGS)} "
                         f"(remedi_patches.kv_cache); {type(model).__name__} does not: use decoding 'llada' "
                         "(CLI: --decoding llada)")

    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt
    context = BlockContext(model, prompt, attention_mask, kv_cache)
    end_block = torch.full((batch,), -1, dtype=torch.long, device=prompt.device)  # first block with EOS, per row
    num_blocks = gen_length // block_length
    whole = slice(0, block_length)  # the RNG draws and ranking rows take the block's own shape (B, N)

    for b in range(num_blocks):
        start = prompt_len + b * block_length
        positions = context.block_positions(b, block_length)  # (B, N)
        tokens = x[:, start:start + block_length]  # (B, N) all masks
        for i, (n, k) in enumerate(rule.schedule(block_length, steps_per_block)):  # n_i, k_i (None: parallel)
            logits, ups_logits = context.read(tokens, positions)  # (B, N, V), (B, N) | None
            tokens, committed, remasked = rule.step(tokens, logits, ups_logits, n, k, block_length, whole,
                                                    None if trajectory is None else trajectory.observer)
            x[:, start:start + block_length] = tokens
            left = (tokens == mask_id).sum(dim=-1)  # (B,)
            if trajectory is not None:
                trajectory.record(b, i, start, committed, remasked, left, x)
            if rule.parallel and not bool(left.any()):
                break
        if eos_id is not None:
            end_block = update_end_block(end_block, tokens, b, eos_id)
            if bool((end_block >= 0).all()):
                break
        if b + 1 < num_blocks:
            context.append(tokens, positions)
    if eos_id is not None:
        x = fill_after_end(x, end_block, prompt_len, block_length, eos_id)
    if trajectory is not None:
        trajectory.add_call(x[:, prompt_len:], context.forwards, started)
    return x
