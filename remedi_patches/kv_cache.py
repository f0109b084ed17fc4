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

LLaDA-style decoding's approximate caches (Fast-dLLM, remedi_patches.llada_cache) use two more operations on a
cache written by one forward of the whole sequence: `truncate(n)` keeps its first n positions (the prefix cache),
and `with cache.replacing(window):` makes the forwards inside write their keys / values over the cached positions
`window` instead of appending (the dual cache: a forward of the block alone refreshes the block's entries, and its
queries attend to every cached position). Those forwards pass explicit position_ids.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch


class KVCache:
    """Per-layer keys/values (B, H_kv, Lc, head_dim) of the cached tokens, and `key_mask` (B, Lc): True = real."""

    def __init__(self) -> None:
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.key_mask: Optional[torch.Tensor] = None
        self.window: Optional[slice] = None  # set by `replacing`: the cached positions a forward overwrites

    def __len__(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def keys_values(self, layer_id: int, k: torch.Tensor, v: torch.Tensor,
                    write: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached + current keys and values of one layer, joined along the sequence axis (-2); stored when write.
        Inside `replacing(window)`: the current ones are written over the cached positions `window` (in place) and
        the whole cache is returned."""
        past = self._kv.get(layer_id)
        if self.window is not None:
            if past is None or past[0].shape[0] != k.shape[0] or k.shape[-2] != len(range(len(self))[self.window]):
                raise ValueError(f"a forward inside KVCache.replacing({self.window}) must feed exactly those "
                                 f"{len(range(len(self))[self.window])} cached positions for every row, with the "
                                 "same model that wrote the cache")
            past[0][..., self.window, :] = k
            past[1][..., self.window, :] = v
            return past
        if past is None and len(self):
            raise ValueError(f"the KV cache holds {len(self)} positions but nothing for attention layer {layer_id}: "
                             "it was filled by another model; start a new KVCache for each model and prompt batch")
        if past is not None:
            if past[0].shape[0] != k.shape[0]:
                raise ValueError(f"the KV cache was filled for batch size {past[0].shape[0]} but this forward has "
                                 f"{k.shape[0]} rows; use one KVCache per prompt batch")
            k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
        if write:  # owned tensors (a first write may be a view of the qkv projection): `replacing` writes into them
            self._kv[layer_id] = (k, v) if past is not None else (k.clone(), v.clone())
        return k, v

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached positions of every layer (and of key_mask)."""
        self._kv = {layer: (k[..., :length, :], v[..., :length, :]) for layer, (k, v) in self._kv.items()}
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :length]

    @contextmanager
    def replacing(self, window: slice) -> Iterator["KVCache"]:
        """Forwards inside write their keys / values over the cached positions `window` (no append)."""
        if not len(self):
            raise ValueError("KVCache.replacing needs a filled cache: write the whole sequence first (use_cache=True)")
        self.window = window
        try:
            yield self
        finally:
            self.window = None

    def extend(self, key_mask: torch.Tensor) -> None:
        """Record which of the positions just written are real tokens (B, L) bool; called once per writing forward."""
        if self.window is not None:
            raise ValueError("use_cache=True appends to the cache, which a forward inside KVCache.replacing must not")
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


def prompt_positions(attention_mask: Optional[torch.Tensor], batch: int, length: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, L) counting each row's real tokens from 0 (pads 0), real_len (B,)): the RoPE positions the
    cache-taking models give a (B, L) key mask by default."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length), torch.full((batch,), length, device=device)
    real = attention_mask.long()
    return (real.cumsum(dim=-1) - 1).clamp(min=0), real.sum(dim=-1)


def attention_keep(attention_mask: Optional[torch.Tensor], cache: Optional[KVCache], batch: int,
                   length: int) -> Optional[torch.Tensor]:
    """Which keys each query attends to over [cached | current]: (B, 1, 1, Lc + L) or (B, 1, L, Lc + L) bool,
    or None when every query sees every key (so SDPA keeps its mask-free kernels).

    attention_mask: None; (B, L) 1/0 of the current tokens (0 = padding, never attended); or (B, 1, L, Lc + L)
    bool, True = attend (a full mask such as the block-causal one of the uncached reference decoder).
    """
    cached = cache.key_mask if cache is not None and len(cache) else None
    if cached is not None and cache.window is not None:  # the current tokens overwrite cached positions
        if attention_mask is not None:
            raise ValueError("a forward inside KVCache.replacing takes no attention_mask: its queries attend to the "
                             "cached keys (their key_mask)")
        if cached.shape[0] != batch:
            raise ValueError(f"the KV cache was filled for batch size {cached.shape[0]} but this forward has {batch} "
                             "rows; use one KVCache per prompt batch")
        return None if bool(cached.all()) else cached[:, None, None, :]
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
