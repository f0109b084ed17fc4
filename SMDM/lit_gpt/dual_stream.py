"""The paper's RemeDi on SMDM (DESIGN.md 10): a TransEncoder main stream (TPS) beside an Unmasking Policy Stream (UPS).

After main layer b = ups_positions[j] the UPS runs one block of the main architecture, on u = x (j = 0) or x + u
(j > 0), and feeds back into the main stream: x = x + feedback_j(feedback_norm_j(u)), which the next main layer
reads. After the last main layer, logits = lm_head(ln_f(x)) and confidences = confidence(ups.ln_f(u_last)): raw UPS
logits (no sigmoid), one per position, from the same forward.

Weights beside TransEncoder's (`lit_gpt.model`), j = 0 .. len(ups_positions) - 1:

    ups.h.{j}.*                     a Block, the names of transformer.h.{i}.*
    ups.feedback.{j}.weight, .bias  (d, d), (d,)   zero-initialised: a fresh model's TPS equals its main stream's
    ups.feedback_norm.{j}.weight    (d,)
    ups.ln_f.weight                 (d,)
    ups.confidence.weight, .bias    (1, d), (1,)

KV cache layer ids (block decoding): main layers 0..n_layer-1, UPS block j n_layer + j.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lit_gpt.config import Config
from lit_gpt.model import Block, RMSNorm, TransEncoder, smdm_init_
from remedi_patches.kv_cache import KVCache
from remedi_patches.modeling_wrappers import RemeDiOutput

UPS_INITS = ("copy", "smdm")


def default_ups_positions(n_layer: int) -> list[int]:
    """Every n_layer // 3 main layers from layer 0, the last one before the final layer: the official RemeDi's
    [0, 10, 20, 30] of 32 layers, [0, 2, 4] of the embedded model's 6."""
    return list(range(0, n_layer - 1, max(1, n_layer // 3))) or [0]


class UPSStream(nn.Module):
    """The UPS blocks, their feedback into the main stream and the confidence head (names in the module doc)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        n, d = len(config.ups_positions), config.n_embd
        self.h = nn.ModuleList(Block(config) for _ in range(n))
        self.feedback = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.feedback_norm = nn.ModuleList(RMSNorm(d, eps=config.norm_eps) for _ in range(n))
        self.ln_f = RMSNorm(d, eps=config.norm_eps)
        self.confidence = nn.Linear(d, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """UPS blocks: SMDM's init (as the main blocks); feedback zero; norms one; confidence N(0, 0.02^2)
        truncated, bias zero (the official RemeDi's)."""
        smdm_init_(self.h, self.config)
        for linear in self.feedback:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for norm in (*self.feedback_norm, self.ln_f):
            norm.reset_parameters()
        nn.init.trunc_normal_(self.confidence.weight, std=0.02)
        nn.init.zeros_(self.confidence.bias)

    def feedback_of(self, j: int, u: torch.Tensor) -> torch.Tensor:
        """What UPS block j's output u (B, T, d) adds to the main stream: feedback_j(feedback_norm_j(u))."""
        return self.feedback[j](self.feedback_norm[j](u))

    def confidences(self, u: torch.Tensor) -> torch.Tensor:
        return self.confidence(self.ln_f(u)).squeeze(-1)  # (B, T) raw logits


class RemeDiTransEncoder(TransEncoder):
    """Dual-stream TransEncoder: forward -> RemeDiOutput(logits (B, T, padded_vocab), confidences (B, T)).

    The forward's arguments are TransEncoder's (padding mask or 4-D mask, position_ids, KV cache); the UPS blocks
    attend with the same mask and positions. Build it from a config with `ups_positions`, from a trained
    single-stream model with `remedi_from_backbone`, or load a folder with `lit_gpt.model.load_smdm_folder`.
    """
    has_ups_stream = True

    def __init__(self, config: Config) -> None:
        if config.ups_positions is None:
            raise ValueError(f"SMDM config {config.name!r} has no ups_positions: a dual-stream RemeDi needs the "
                             "main layers its UPS blocks follow (e.g. lit_gpt.dual_stream.default_ups_positions)")
        super().__init__(config)
        self.ups = UPSStream(config)
        self._ups_index = {b: j for j, b in enumerate(config.ups_positions)}

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "ups" in self._modules:  # absent while TransEncoder.__init__ initialises the main stream
            self.ups.reset_parameters()

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False) -> RemeDiOutput:
        step = self.attention_inputs(idx, attention_mask, position_ids, past_key_values, use_cache)
        x, u = self.transformer.wte(idx), None  # (B, T, d)
        for i, block in enumerate(self.transformer.h):
            x = self.run_block(block, x, step, i)
            j = self._ups_index.get(i)
            if j is not None:  # UPS block j on the main stream's x (plus the UPS state after the first)
                u = self.run_block(self.ups.h[j], x if u is None else x + u, step, self.config.n_layer + j)
                x = x + self.ups.feedback_of(j, u)
        step.finish()
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, padded_vocab)
        return RemeDiOutput(logits, self.ups.confidences(u))


@torch.no_grad()
def remedi_from_backbone(backbone: TransEncoder, ups_positions: Optional[list[int]] = None,
                         ups_init: str = "copy") -> RemeDiTransEncoder:
    """A dual-stream RemeDi whose TPS is `backbone`'s exactly (its weights copied, feedback zero), on the
    backbone's device and dtype. ups_positions: None = `default_ups_positions`. ups_init: "copy" = UPS block j
    starts as a copy of main block b_j + 1, the block the main stream runs next on the same input (main block
    b_j when b_j is the last layer): trained features from the start (UPS block 0 outputs exactly the main
    stream's next state); "smdm" = SMDM's random init."""
    if backbone.has_ups_stream:
        raise ValueError(f"remedi_from_backbone takes a single-stream TransEncoder; {type(backbone).__name__} "
                         "already has a UPS stream")
    if ups_init not in UPS_INITS:
        raise ValueError(f"ups_init={ups_init!r}: use one of {', '.join(UPS_INITS)}")
    config = backbone.config
    positions = default_ups_positions(config.n_layer) if ups_positions is None else ups_positions
    weight = next(backbone.parameters())
    model = RemeDiTransEncoder(Config.from_dict({**config.to_dict(), "ups_positions": positions}))
    model = model.to(device=weight.device, dtype=weight.dtype)
    model.load_state_dict({**model.state_dict(), **backbone.state_dict()})  # strict: the main stream's names
    if ups_init == "copy":
        for j, b in enumerate(model.config.ups_positions):
            model.ups.h[j].load_state_dict(backbone.transformer.h[min(b + 1, config.n_layer - 1)].state_dict())
    return model
