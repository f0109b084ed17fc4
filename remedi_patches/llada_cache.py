"""The forwards of LLaDA-style decoding: the whole sequence every step, or Fast-dLLM's approximate KV caches.

    reader = SequenceReader(model, attention_mask, cache="dual", cfg_scale=0.0, uncond_positions=..., mask_id=...)
    logits, ups_logits = reader.read(x, block, step)   # (B, N, V), (B, N) | None for the block's positions
    reader.forwards                                     # NFE

cache None: every step is one forward of the whole (B, L) sequence: upstream LLaDA, exact.
cache "prefix": at the block's first step (and every `interval` steps of it) one forward of the whole sequence
    decodes the step and writes every position's keys / values; the cache then keeps the positions before the
    block. Later steps feed the block and everything after it, attending to the cached prefix.
cache "dual": the same refresh, keeping every position; later steps feed the block alone, which writes its fresh
    keys / values over its cached ones and attends to the cached prefix and suffix.

Both caches are approximate for a bidirectional model (Fast-dLLM sec. 3.2): the cached keys were computed when the
block (and, for dual, the suffix) held other tokens, so they are stale until the next refresh. A refresh at every
step (interval 1) is exact: each step is then the whole-sequence forward. Block diffusion
(remedi_patches.block_decoding) caches exactly instead, because its model never lets the past see the future.

A cache needs a model implementing the cache contract of remedi_patches.kv_cache (native LLaDA, SMDM, the
dual-stream RemeDi, any of them under a UPS head); `takes_cache` says whether it does. Classifier-free guidance
runs the unconditional copy (prompt masked) as more rows of the same forwards and caches.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from remedi_patches.backbones import unwrap
from remedi_patches.kv_cache import KVCache, prompt_positions
from remedi_patches.modeling_wrappers import UPSModel, logits_of

CACHES = ("prefix", "dual")  # SamplerSettings.cache; None = no cache
CACHE_ARGS = ("position_ids", "past_key_values", "use_cache")


def takes_cache(model: nn.Module) -> bool:
    """Whether model(...) accepts the cache arguments (position_ids, past_key_values, use_cache)."""
    inner = unwrap(model.backbone if isinstance(model, UPSModel) else model)
    parameters = inspect.signature(type(inner).forward).parameters
    return all(name in parameters for name in CACHE_ARGS)


def check_cache(cache: Optional[str], interval: Optional[int]) -> None:
    """ValueError naming a bad cache setting and its fix."""
    if cache not in (None, *CACHES):
        raise ValueError(f"unknown cache {cache!r}; use one of {list(CACHES)} or None (no cache)")
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"cache_interval must be a positive integer (steps between refreshes), got {interval!r}")
        if cache is None:
            raise ValueError(f"cache_interval={interval} refreshes a KV cache, but cache is None; set cache "
                             "'prefix' or 'dual', or drop cache_interval")


class SequenceReader:
    """What one step of LLaDA-style decoding computes: the TPS logits (after CFG) and UPS logits of the block."""

    def __init__(self, model: nn.Module, attention_mask: Optional[torch.Tensor], cache: Optional[str] = None,
                 interval: Optional[int] = None, cfg_scale: float = 0.0,
                 uncond_positions: Optional[torch.Tensor] = None, mask_id: int = 0) -> None:
        """attention_mask: (B', L) 1/0 over the whole sequence (B' = 2B under CFG) or None; uncond_positions:
        (B, L) bool, the positions the unconditional copy masks (the prompt) when cfg_scale > 0."""
        check_cache(cache, interval)
        if cache is not None and not takes_cache(model):
            raise ValueError(f"cache={cache!r} needs a model whose forward takes {', '.join(CACHE_ARGS)} "
                             f"(remedi_patches.kv_cache); {type(unwrap(model)).__name__} does not: use cache None")
        self.model, self.attention_mask, self.cache, self.interval = model, attention_mask, cache, interval
        self.cfg_scale, self.uncond_positions, self.mask_id = cfg_scale, uncond_positions, mask_id
        self.kv: Optional[KVCache] = None
        self.positions: Optional[torch.Tensor] = None  # (B', L) RoPE positions, the model's own defaults
        self.forwards = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L), and under CFG its unconditional copy below it (2B, L)."""
        if self.cfg_scale > 0:
            return torch.cat([x, x.masked_fill(self.uncond_positions, self.mask_id)])
        return x

    def _refreshes(self, step: int) -> bool:
        return step == 0 or (self.interval is not None and step % self.interval == 0)

    def _forward(self, ids: torch.Tensor, block: slice, step: int):
        """One model call -> (output, the column of `ids` where the block starts in it)."""
        self.forwards += 1
        if self.cache is None:
            return self.model(ids, attention_mask=self.attention_mask), block.start
        if self.positions is None:
            self.positions = prompt_positions(self.attention_mask, *ids.shape, ids.device)[0]
        if self._refreshes(step):
            self.kv = KVCache()
            output = self.model(ids, attention_mask=self.attention_mask, position_ids=self.positions,
                                past_key_values=self.kv, use_cache=True)
            if self.cache == "prefix":
                self.kv.truncate(block.start)
            return output, block.start
        if self.cache == "prefix":  # the block and everything after it, over the cached prefix
            return self.model(ids[:, block.start:], position_ids=self.positions[:, block.start:],
                              past_key_values=self.kv), 0
        with self.kv.replacing(block):  # dual: the block alone, its keys / values refreshed in place
            return self.model(ids[:, block], position_ids=self.positions[:, block], past_key_values=self.kv), 0

    def read(self, x: torch.Tensor, block: slice, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, L) the sequence; block: its positions being decoded; step: 0-based step within the block.
        -> (TPS logits of the block after CFG (B, N, V), UPS logits of the block (B, N) or None)."""
        b, n = x.shape[0], block.stop - block.start
        output, at = self._forward(self._rows(x), block, step)
        logits = logits_of(output)[:, at:at + n]  # (B', N, V)
        if self.cfg_scale > 0:  # logits = un + (cfg + 1)(cond - un)
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        ups = getattr(output, "confidences", None)  # from the conditional rows under CFG
        return logits, None if ups is None else ups[:b, at:at + n]
