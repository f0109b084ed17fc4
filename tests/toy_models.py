"""Tiny deterministic mask predictors shared by the sampler tests (test_generate_upstream, test_dynamic_remasking,
test_ups_head, test_sampling); upstream LLaDA's sampler written out as their reference is bench/upstream_llada.py."""
import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
from torch import nn

V = 40          # vocabulary: the head outputs V logits
MASK = V        # SMDM-style mask id: the embedding has V + 1 rows, the head never predicts it
EOS, EOT, PAD = 1, 2, 0
D = 32


@dataclass
class ToyConfig:
    hidden_size: int = D

    def to_dict(self) -> dict:  # what PEFT reads from a model's config
        return asdict(self)


class ToyMDM(nn.Module):
    """Deterministic bidirectional mask predictor: token + position embedding, one self-attention layer,
    an MLP, a final norm and a vocabulary head. Positions count only real tokens (attention_mask cumsum)
    and padded keys are ignored, so a left-padded row gives the logits of the row alone.
    forward returns an object with .logits and, on request, .hidden_states (last one after `norm`)."""

    def __init__(self, seed: int = 0, d: int = D, max_len: int = 64) -> None:
        super().__init__()
        self.config = ToyConfig(hidden_size=d)
        self.wte = nn.Embedding(V + 1, d)
        self.wpe = nn.Embedding(max_len, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, V)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def run(self, idx, attention_mask=None):
        b, n = idx.shape
        if attention_mask is None:
            pos, bias = torch.arange(n).expand(b, n), None
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            bias = torch.zeros(b, 1, n, dtype=self.wte.weight.dtype).masked_fill(attention_mask[:, None, :] == 0,
                                                                                 -torch.inf)
        h0 = self.wte(idx) + self.wpe(pos)
        q, k, v = self.qkv(h0).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        att = (scores if bias is None else scores + bias).softmax(dim=-1) @ v
        h = h0 + self.proj(att)
        h = self.norm(h + self.mlp(h))
        return h0, h, self.head(h)

    def forward(self, idx, attention_mask=None, output_hidden_states=False):
        h0, h, logits = self.run(idx, attention_mask)
        return SimpleNamespace(logits=logits, hidden_states=(h0, h) if output_hidden_states else None)


class BareToyMDM(ToyMDM):
    """Same network, SMDM-TransEncoder-shaped interface: returns the bare logits tensor, no hidden states."""

    def forward(self, idx, attention_mask=None):
        return self.run(idx, attention_mask)[2]


PROMPT = torch.tensor([[5, 9, 12, 7, 3]])
SHORT = torch.tensor([[8, 20, 6]])


def padded_batch():
    """Left-padded batch of PROMPT and SHORT."""
    ids = torch.full((2, 5), PAD)
    ids[0], ids[1, 2:] = PROMPT[0], SHORT[0]
    am = torch.ones(2, 5, dtype=torch.long)
    am[1, :2] = 0
    return ids, am


class CacheToyMDM(nn.Module):
    """A toy honouring the block-decoding forward contract of remedi_patches.kv_cache: token + position embedding,
    two attention layers reading / writing a KVCache (layer ids 0, 1), a final norm, a vocabulary head and a
    per-position confidence (the UPS logits, `.confidences`). Positions: position_ids, else counting real tokens.
    `has_ups_stream` is left False here (DualCacheToyMDM sets it)."""

    def __init__(self, seed: int = 0, d: int = D, max_len: int = 64) -> None:
        super().__init__()
        self.config = ToyConfig(hidden_size=d)
        self.wte = nn.Embedding(V + 1, d)
        self.wpe = nn.Embedding(max_len, d)
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, V)
        self.confidence = nn.Linear(d, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, idx, attention_mask=None, *, position_ids=None, past_key_values=None, use_cache=False,
                output_hidden_states=False):
        from remedi_patches.kv_cache import attention_keep, current_key_mask

        b, n = idx.shape
        if position_ids is None:
            real = torch.ones_like(idx) if attention_mask is None or attention_mask.dim() != 2 else attention_mask
            position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
        keep = attention_keep(attention_mask, past_key_values, b, n)  # (B, 1, 1|L, Lc + L) or None
        h = self.wte(idx) + self.wpe(position_ids)
        for layer, (qkv, proj) in enumerate(zip(self.qkv, self.proj)):
            q, k, v = qkv(h).chunk(3, dim=-1)
            if past_key_values is not None:
                k, v = past_key_values.keys_values(layer, k[:, None], v[:, None], write=use_cache)
                k, v = k[:, 0], v[:, 0]
            scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, L, Lc + L)
            if keep is not None:
                scores = scores.masked_fill(~keep[:, 0], -torch.inf)
            h = h + proj(scores.softmax(dim=-1) @ v)
        if use_cache:
            past_key_values.extend(current_key_mask(attention_mask, b, n, idx.device))
        h = self.norm(h)
        return SimpleNamespace(logits=self.head(h), confidences=self.confidence(h).squeeze(-1),
                               hidden_states=(h,) if output_hidden_states else None)


class DualCacheToyMDM(CacheToyMDM):
    """The same toy declaring its own UPS stream (as the dual-stream RemeDi models do)."""

    has_ups_stream = True


def check_invariants(out, trajectory, prompt, shape, remask, eos_filled=None):
    """The sampler's per-step invariants, from its trajectory (LLaDA-style and block decoding alike): every step
    leaves exactly B - k_i masks in its block, keeps the prompt and other blocks, and records exactly what it
    committed and re-masked (nothing re-masked when `remask` is False); at the end no mask is left and the last
    tokens are the output, except the EOS a block decoder fills after a row's EOS block (`eos_filled` (B, Lp + G)
    bool says where; without it every one of the `steps` steps must have run)."""
    from remedi_patches.remasking import commit_schedule

    gen_length, block_length, steps = shape
    schedule = commit_schedule(block_length, steps // (gen_length // block_length))
    lp = prompt.shape[1]
    prev = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), MASK)], dim=1)
    if eos_filled is None:
        assert len(trajectory.steps) == steps
    for rec in trajectory.steps:
        k = schedule[rec.step]
        block = slice(rec.start, rec.start + block_length)
        assert rec.start == lp + rec.block * block_length
        now = rec.tokens
        assert (rec.mask_count == block_length - k).all()
        assert ((now[:, block] == MASK).sum(-1) == block_length - k).all()  # exactly B - k_i masks
        outside = torch.ones(now.shape[1], dtype=torch.bool)
        outside[block] = False
        assert torch.equal(now[:, outside], prev[:, outside])  # prompt, earlier and later blocks unchanged
        was_masked, is_masked = prev[:, block] == MASK, now[:, block] == MASK
        assert torch.equal(rec.committed, was_masked & ~is_masked)
        assert torch.equal(rec.remasked, ~was_masked & is_masked)
        kept = ~was_masked & ~is_masked
        assert torch.equal(now[:, block][kept], prev[:, block][kept])  # a kept token is never swapped
        assert remask or not rec.remasked.any()
        prev = now
    filled = torch.zeros_like(out, dtype=torch.bool) if eos_filled is None else eos_filled
    assert torch.equal(out[~filled], prev[~filled]) and (out[filled] == EOS).all()
    assert not (out == MASK).any()

