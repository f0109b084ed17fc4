"""The key/value cache of block-diffusion decoding (DESIGN.md 10), one class for every backbone that supports it.

Block diffusion decodes one block of masks at a time. The prompt and every finished block are encoded once; their
keys and values (after RoPE) are kept here per attention layer, with which cached positions are real tokens:

    cache = KVCache()
    model(prompt, attention_mask=pad_mask, position_ids=pos, past_key_values=cache, use_cache=True)  # write
    out = model(block, position_ids=block_pos, past_key_values=cache)        # read: the block sees cache + itself
    model(finished_block, position_ids=block_pos, past_key_values=cache, use_cache=True)  # append it

A model supporting the cache does, per forward:
    keep = attention_keep(attention_mask, cache, B, L)     # (B, 1, Lq|1, Lc + L) bool or None (attend everywhere)
    per attention layer:  k, v = cache.keys_values(layer_id, k, v, write=use_cache)   # cached + current
    after its layers:     if use_cache: cache.extend(current_key_mask(attention_mask, B, L, device))
Layer ids: main stream 0..n_layers-1; UPS blocks of a dual-stream model n_layers + j.
"""
from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Per-layer keys/values (B, H_kv, Lc, head_dim) of the cached tokens, and `key_mask` (B, Lc): True = real."""

    def __init__(self) -> None:
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.key_mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def keys_values(self, layer_id: int, k: torch.Tensor, v: torch.Tensor,
                    write: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached + current keys and values of one layer, joined along the sequence axis (-2); stored when write."""
        past = self._kv.get(layer_id)
        if past is None and len(self):
            raise ValueError(f"the KV cache holds {len(self)} positions but nothing for attention layer {layer_id}: "
                             "it was filled by another model; start a new KVCache for each model and prompt batch")
        if past is not None:
            if past[0].shape[0] != k.shape[0]:
                raise ValueError(f"the KV cache was filled for batch size {past[0].shape[0]} but this forward has "
                                 f"{k.shape[0]} rows; use one KVCache per prompt batch")
            k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
        if write:
            self._kv[layer_id] = (k, v)
        return k, v

    def extend(self, key_mask: torch.Tensor) -> None:
        """Record which of the positions just written are real tokens (B, L) bool; called once per writing forward."""
        key_mask = key_mask.bool()
        self.key_mask = key_mask if self.key_mask is None else torch.cat([self.key_mask, key_mask], dim=1)


def current_key_mask(attention_mask: Optional[torch.Tensor], batch: int, length: int,
                     device: torch.device) -> torch.Tensor:
    """(B, L) bool: which of this forward's tokens are real (the 2-D attention mask, else all)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError("use_cache=True needs a (batch, length) key mask or none: the cache records which written "
                         "positions are real; pass the full 4-D mask only to forwards that do not write the cache")
    return attention_mask.bool()


def attention_keep(attention_mask: Optional[torch.Tensor], cache: Optional[KVCache], batch: int,
                   length: int) -> Optional[torch.Tensor]:
    """Which keys each query attends to over [cached | current]: (B, 1, 1, Lc + L) or (B, 1, L, Lc + L) bool,
    or None when every query sees every key (so SDPA keeps its mask-free kernels).

    attention_mask: None; (B, L) 1/0 of the current tokens (0 = padding, never attended); or (B, 1, L, Lc + L)
    bool, True = attend (a full mask such as the block-causal one of the uncached reference decoder).
    """
    cached = cache.key_mask if cache is not None and len(cache) else None
    lc = 0 if cached is None else cached.shape[1]
    if attention_mask is not None and attention_mask.dim() == 4:
        if tuple(attention_mask.shape) != (batch, 1, length, lc + length):
            raise ValueError(f"a 4-D attention mask must have shape (batch, 1, length, cached + length) = "
                             f"{(batch, 1, length, lc + length)}, got {tuple(attention_mask.shape)}")
        return attention_mask.bool()
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, length) = "
                         f"{(batch, length)} or a 4-D (batch, 1, length, cached + length) mask")
    if cached is None and attention_mask is None:
        return None
    device = attention_mask.device if attention_mask is not None else cached.device
    keys = current_key_mask(attention_mask, batch, length, device)
    if cached is not None:
        if cached.shape[0] != batch:
            raise ValueError(f"the KV cache was filled for batch size {cached.shape[0]} but this forward has {batch} "
                             "rows; use one KVCache per prompt batch")
        keys = torch.cat([cached, keys], dim=1)
    return None if bool(keys.all()) else keys[:, None, None, :]
