"""The paper's RemeDi (DESIGN.md 10): LLaDA's main stream (TPS) plus an unmasking-policy stream (UPS) of full
LLaDA blocks that reads the main stream at several depths and feeds back into it.

For main layer b = ups_positions[j] (the released 9B: [0, 10, 20, 30] of 32):

    x = block_b(x)
    u = x (j = 0)  or  x + u (j > 0);   u = blocks_upm[j](u)       (layer_id n_layers + j: own KV-cache slot)
    x = x + backprop_linears[j](backprop_norms[j](u))              (feedback, zero at init: TPS = LLaDA)
    logits = ff_out(ln_f(x_last));   confidences = linear_confidence(ln_f_upm(u_last)).squeeze(-1)   (B, L), raw

Both come from one forward. The weight names are the released checkpoints' (`model.blocks_upm.{j}.*`,
`model.backprop_linears.{j}`, `model.backprop_norms.{j}`, `model.ln_f_upm`, `model.linear_confidence`, next to
LLaDA's `model.transformer.*`), so maple-research-lab/RemeDi-Instruct and RemeDi-RL load without remote code.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from remedi_patches.kv_cache import KVCache

from .configuration_remedi import RemeDiConfig
from .modeling_llada import LLaDABlock, LLaDAModel, LLaDAModelLM, LLaDARMSNorm, StreamOutput


@dataclass
class RemeDiModelOutput(ModelOutput):
    logits: torch.Tensor | None = None  # (B, L, V) TPS logits
    confidences: torch.Tensor | None = None  # (B, L) UPS logits (raw, no sigmoid)
    cache: KVCache | None = None  # the KVCache used (transformers 5's name; .past_key_values reads it too)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # input of every main block, then the output of ln_f


class RemeDiModel(LLaDAModel):
    """The body under `model.`: LLaDA's `transformer.*` plus the UPS stream's modules."""

    def __init__(self, config: RemeDiConfig):
        super().__init__(config)
        positions = config.resolved_ups_positions()
        config.ups_positions = positions  # saved configs say where the blocks sit
        d, n = config.d_model, config.n_layers
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        self.ups_index = {b: j for j, b in enumerate(positions)}  # main layer -> UPS block after it
        self.blocks_upm = nn.ModuleList(LLaDABlock(config, n + j) for j in range(len(positions)))
        self.backprop_linears = nn.ModuleList(nn.Linear(d, d, bias=True) for _ in positions)
        self.backprop_norms = nn.ModuleList(LLaDARMSNorm(d, config.rms_norm_eps, norm_bias) for _ in positions)
        self.ln_f_upm = LLaDARMSNorm(d, config.rms_norm_eps, norm_bias)
        self.linear_confidence = nn.Linear(d, 1, bias=True)

    def streams(
        self, x: torch.Tensor, attention: tuple, hidden: list | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Main blocks with the UPS blocks after `ups_positions` -> (last main output, confidences (B, L))."""
        u = None
        for b, block in enumerate(self.transformer.blocks):
            if hidden is not None:
                hidden.append(x)
            x = block(x, *attention)
            j = self.ups_index.get(b)
            if j is not None:
                u = self.blocks_upm[j](x if u is None else x + u, *attention)
                x = x + self.backprop_linears[j](self.backprop_norms[j](u))
        return x, self.linear_confidence(self.ln_f_upm(u)).squeeze(-1)


class RemeDiUPMModelLM(LLaDAModelLM):
    """Dual-stream RemeDi as a transformers model (model_type "RemeDi"; reads the released "llada" folders too).

    forward() takes LLaDAModelLM's arguments (KV cache included) and returns a RemeDiModelOutput."""

    config_class = RemeDiConfig
    has_ups_stream = True
    body_class = RemeDiModel

    def __init__(self, config: RemeDiConfig):
        if not isinstance(config, RemeDiConfig):
            raise ValueError(
                f"RemeDiUPMModelLM needs a RemeDiConfig, got {type(config).__name__}: build one with "
                "RemeDiConfig(**config.to_dict()) (ups_positions says where the UPS blocks sit)"
            )
        super().__init__(config)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """LLaDA's init, then the official one for the UPS parts: feedback linears zero (so a fresh RemeDi's TPS is
        its LLaDA), confidence linear trunc-normal(0.02) with bias 0, UPS block linears mitchell (norms one, biases
        zero as everywhere). transformers calls this per module holding parameters; loaded weights are never
        touched."""
        super()._init_weights(module)
        body = self.model
        if any(module is linear for linear in body.backprop_linears):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif module is body.linear_confidence:
            init.trunc_normal_(module.weight, std=0.02)
        elif (std := mitchell_stds(body.blocks_upm).get(module)) is not None:
            init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)

    def output(self, streams: StreamOutput, cache: KVCache | None) -> RemeDiModelOutput:
        return RemeDiModelOutput(logits=streams.logits, confidences=streams.confidences, cache=cache,
                                 hidden_states=streams.hidden_states)


def mitchell_stds(blocks: nn.ModuleList) -> dict[nn.Module, float]:
    """OLMo's "mitchell" init (what LLaDA's remote code gives the UPS blocks), as linear -> standard deviation of
    its truncated (3 sigma) normal: input projections 1/sqrt(d_in), output projections (attn_out, ff_out)
    1/sqrt(d_in) / sqrt(2 (layer_id + 1))."""
    stds = {}
    for block in blocks:
        for name in ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj", "attn_out", "ff_out"):
            linear = getattr(block, name)
            depth = math.sqrt(2 * (block.layer_id + 1)) if name in ("attn_out", "ff_out") else 1.0
            stds[linear] = 1 / math.sqrt(linear.in_features) / depth
    return stds
