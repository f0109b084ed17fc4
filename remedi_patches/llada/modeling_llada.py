"""Native LLaDA backbone: a transformers model whose weights load from GSAI-ML/LLaDA-8B checkpoints.

Architecture (the upstream "llama" block of LLaDA, non-causal):

    x = wte(ids)
    per block:  h = attn_norm(x);  x = x + attn_out(SDPA(rope(q_proj h), rope(k_proj h), v_proj h, key padding bias))
                h = ff_norm(x);    x = x + ff_out(silu(ff_proj h) * up_proj h)
    logits = ff_out(ln_f(x))       (wte.weight instead when weight_tying)

RMSNorm normalises in float32; RoPE (rotate-half form, theta = rope_theta) is computed and applied in
float32 whatever the model dtype. Weight names are those of the upstream checkpoint
(`model.transformer.blocks.{i}.q_proj.weight`, ...), so `from_pretrained` reads them unchanged.

Block-diffusion decoding (DESIGN.md 10) runs the same model with a `remedi_patches.kv_cache.KVCache`: explicit
`position_ids`, a (B, 1, L, Lc + L) bool attention mask, `past_key_values` (read) and `use_cache` (append); see
`LLaDAModelLM.forward`.
"""

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from remedi_patches.kv_cache import KVCache, attention_keep, current_key_mask

from .checkpoint_files import checkpoint_shapes
from .configuration_llada import LLaDAConfig

# upstream config values this implementation runs; anything else is refused when the model is built
SUPPORTED = {
    "block_type": "llama",
    "block_group_size": 1,
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "rope": True,
    "alibi": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
}


def check_supported(config: LLaDAConfig) -> None:
    """Raise one ValueError naming the first config value the native LLaDA model cannot run."""
    for key, value in SUPPORTED.items():
        if getattr(config, key) != value:
            raise ValueError(
                f"LLaDA config has {key}={getattr(config, key)!r}, but the native LLaDA model only implements "
                f"{key}={value!r} (the LLaDA-8B architecture). Set {key} to {value!r} in config.json, or load "
                "this checkpoint with its own remote code."
            )
    if config.d_model % config.n_heads:
        raise ValueError(f"LLaDA config: d_model={config.d_model} is not divisible by n_heads={config.n_heads}.")
    n_kv = config.effective_n_kv_heads
    if n_kv < 1 or config.n_heads % n_kv:
        raise ValueError(
            f"LLaDA config: n_heads={config.n_heads} is not a multiple of n_kv_heads={n_kv}; "
            "set n_kv_heads to a divisor of n_heads."
        )
    if config.multi_query_attention is not None and config.n_kv_heads is not None:
        wanted = 1 if config.multi_query_attention else config.n_heads
        if config.n_kv_heads != wanted:
            raise ValueError(
                f"LLaDA config: multi_query_attention={config.multi_query_attention} contradicts "
                f"n_kv_heads={config.n_kv_heads}; set multi_query_attention to null."
            )
    if config.num_embeddings < config.vocab_size:
        raise ValueError(
            f"LLaDA config: embedding_size={config.embedding_size} is smaller than vocab_size={config.vocab_size}."
        )


class LLaDARMSNorm(nn.Module):
    """RMSNorm: normalise in float32, cast back, then scale (and shift when the config has norm biases)."""

    def __init__(self, size: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        y = self.weight * y
        return y + self.bias if self.bias is not None else y


def default_position_ids(
    attention_mask: torch.Tensor | None, batch: int, length: int, device, start: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, L) positions counting real tokens only (a left-padded row gets its positions from alone), else arange;
    shifted by `start` (B,), the real tokens already in a KV cache. A 4-D mask says nothing about padding: arange."""
    if attention_mask is None or attention_mask.dim() != 2:
        positions = torch.arange(length, device=device).expand(batch, length)
    else:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions if start is None else positions + start[:, None]


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, sin of shape (B, 1, L, head_dim) in the rotate-half layout (frequencies repeated twice)."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (hd/2,)
    angles = position_ids.float()[..., None] * inv_freq  # (B, L, hd/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, L, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """Rotate x (B, H, L, hd) by the positions in cos/sin; in float32 when full_precision, result in x.dtype."""
    dtype = torch.float32 if full_precision else x.dtype
    xr = x.to(dtype)
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xr * cos.to(dtype) + rotated * sin.to(dtype)).to(x.dtype)


def padding_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias of the bool keep mask's shape ((B, 1, 1|Lq, Lk)): 0 where True, the dtype's min
    (finite, so a query seeing no key gives no NaN) where False."""
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~key_mask, torch.finfo(dtype).min
    )


class LLaDABlock(GradientCheckpointingLayer):
    """The upstream "llama" block: pre-norm non-causal attention with RoPE, then a SwiGLU MLP."""

    def __init__(self, config: LLaDAConfig, layer_id: int):
        super().__init__()
        self.config = config
        self.layer_id = layer_id  # its KV-cache slot and its depth in the mitchell init
        d, hd, hidden = config.d_model, config.head_dim, config.ffn_hidden_size
        n_kv = config.effective_n_kv_heads
        bias, qkv_bias = config.include_bias, config.include_bias or bool(config.include_qkv_bias)
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps, norm_bias)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, n_kv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, n_kv * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps, norm_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=bias)  # gate
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.ff_out = nn.Linear(hidden, d, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keep: torch.Tensor | None,
        cache: KVCache | None = None,
        write: bool = False,
    ) -> torch.Tensor:
        """x (B, L, d); keep (B, 1, 1|L, Lc + L) bool over [cached | current] keys or None (attend to all);
        with a cache the queries also see its keys, and `write` stores this block's keys/values in it."""
        cfg = self.config
        B, L, d = x.shape
        n_kv = cfg.effective_n_kv_heads
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(h).view(B, L, n_kv, cfg.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.v_proj(h).view(B, L, n_kv, cfg.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, cfg.rope_full_precision)
        k = apply_rope(k, cos, sin, cfg.rope_full_precision)
        if cache is not None:
            k, v = cache.keys_values(self.layer_id, k, v, write)  # (B, Hkv, Lc + L, hd)
        att = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if keep is None else padding_bias(keep, q.dtype),
            dropout_p=cfg.attention_dropout if self.training else 0.0,
            is_causal=False,
            enable_gqa=n_kv != cfg.n_heads,
        )  # (B, H, L, hd)
        att = att.transpose(1, 2).reshape(B, L, d)
        x = x + F.dropout(self.attn_out(att), cfg.residual_dropout, self.training)
        h = self.ff_norm(x)
        mlp = self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x + F.dropout(mlp, cfg.residual_dropout, self.training)


class StreamOutput(NamedTuple):
    logits: torch.Tensor  # (B, L, V)
    hidden_states: tuple[torch.Tensor, ...] | None  # input of every main block, then the output of ln_f
    confidences: torch.Tensor | None  # (B, L) raw UPS logits of a dual-stream model; None for LLaDA


class LLaDAModel(nn.Module):
    """The body under `model.`: `transformer.{wte, blocks, ln_f, ff_out}` exactly as in the upstream checkpoint."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        modules = {
            "wte": nn.Embedding(config.num_embeddings, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
            "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps, norm_bias),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.num_embeddings, bias=config.include_bias)
        self.transformer = nn.ModuleDict(modules)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        output_hidden_states: bool,
        cache: KVCache | None = None,
        use_cache: bool = False,
    ) -> StreamOutput:
        cfg = self.config
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, d)
        x = F.dropout(x, cfg.embedding_dropout, self.training)
        B, L = x.shape[:2]
        # checked before any layer writes to the cache: mask shapes, the cache's batch, no 4-D mask when writing
        keep = attention_keep(attention_mask, cache, B, L)  # (B, 1, 1|L, Lc + L) bool, None: attend to all
        written = current_key_mask(attention_mask, B, L, x.device) if use_cache else None  # (B, L)
        if position_ids is None:
            start = cache.key_mask.sum(-1) if cache is not None and len(cache) else None  # (B,) real cached tokens
            position_ids = default_position_ids(attention_mask, B, L, x.device, start)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        hidden = [] if output_hidden_states else None
        x, confidences = self.streams(x, (cos, sin, keep, cache, use_cache), hidden)
        x = self.transformer.ln_f(x)
        if hidden is not None:
            hidden.append(x)
        head = self.transformer.wte.weight if cfg.weight_tying else self.transformer.ff_out.weight
        bias = None if cfg.weight_tying else self.transformer.ff_out.bias
        logits = F.linear(x, head, bias)  # (B, L, embedding_size)
        if use_cache:
            cache.extend(written)
        return StreamOutput(logits, None if hidden is None else tuple(hidden), confidences)

    def streams(
        self, x: torch.Tensor, attention: tuple, hidden: list | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The main blocks on x (B, L, d) -> (output of the last block, None: LLaDA has no UPS stream).
        `attention` = the blocks' arguments after x; the input of every block is appended to `hidden`."""
        for block in self.transformer.blocks:
            if hidden is not None:
                hidden.append(x)
            x = block(x, *attention)
        return x, None


class LLaDAModelLM(PreTrainedModel):
    """LLaDA as a transformers model (`model_type="llada"`, architecture name "LLaDAModelLM")."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True
    has_ups_stream = False  # True for the dual-stream RemeDi (its own confidences; block decoding by default)
    body_class = LLaDAModel  # the module under `model.`

    def __init__(self, config: LLaDAConfig):
        check_supported(config)
        super().__init__(config)
        self.model = self.body_class(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, LLaDARMSNorm):
            init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear | None:
        # with weight_tying the logits come from wte itself; there is no separate head to resize or wrap
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        if self.config.weight_tying:
            raise ValueError("This LLaDA ties its output head to wte (weight_tying=true): set the input embeddings.")
        self.model.transformer.ff_out = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        *,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """logits (B, L, V); with output_hidden_states the input of every block, then the output of ln_f.

        attention_mask: None; (B, L) of 1/0, keys at 0 are never attended; or (B, 1, L, Lc + L) bool over
        [cached | current] keys, True = attend (e.g. a block-causal mask). Without position_ids, positions count
        real tokens only (after the real tokens of the cache), so a left-padded row gives the row's own logits.
        past_key_values: a `KVCache` whose keys the queries also attend to (where its key_mask is True);
        use_cache=True appends this forward's keys/values to it (a new KVCache when none is given). The output's
        `.cache` is the KVCache used (transformers 5's name; `.past_key_values` is its deprecated alias).
        `config.use_cache` is not consulted: caching happens only when asked for.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LLaDAModelLM.forward needs exactly one of input_ids or inputs_embeds.")
        if labels is not None:
            raise ValueError(
                "LLaDAModelLM computes no loss: a masked-diffusion loss depends on the noise, so compute it from "
                ".logits (e.g. remedi_patches.losses.tps_loss) and do not pass labels."
            )
        if kwargs.get("output_attentions"):
            raise ValueError("LLaDA does not return attention weights (it runs SDPA): drop output_attentions.")
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise ValueError(
                f"past_key_values must be a remedi_patches.kv_cache.KVCache, got {type(past_key_values).__name__}; "
                "start one with KVCache() and pass it with use_cache=True to fill it"
            )
        if use_cache and self.is_activation_checkpointing and self.training and torch.is_grad_enabled():
            raise ValueError(
                "use_cache=True with gradient checkpointing in training would write the KV cache again when the "
                "blocks are recomputed: fill the cache under torch.no_grad() or in eval mode"
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        streams = self.model(
            input_ids, inputs_embeds, attention_mask, position_ids, output_hidden_states, past_key_values,
            bool(use_cache),
        )
        out = self.output(streams, past_key_values)
        return out if return_dict else out.to_tuple()

    def output(self, streams: StreamOutput, cache: KVCache | None) -> ModelOutput:
        """The model's output object (LLaDA: logits, the cache, hidden states)."""
        return CausalLMOutputWithPast(logits=streams.logits, cache=cache, hidden_states=streams.hidden_states)

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """transformers' save, refused (one ValueError naming the tensor) when a weight holds NaN or inf."""
        from lit_gpt.model import first_nonfinite

        bad = first_nonfinite(state_dict if state_dict is not None else self.state_dict())
        if bad is not None:
            raise ValueError(f"refusing to save the LLaDA model to {save_directory}: tensor {bad!r} holds NaN or inf "
                             "values (training diverged); save an earlier checkpoint, or retrain with a lower "
                             "learning rate.")
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader, after checking a local checkpoint's files (and, unless ignore_mismatched_sizes,
        its tensor names and shapes) against its config."""
        if pretrained_model_name_or_path is not None:
            folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
            if folder.is_dir():
                config = kwargs.get("config")
                if not isinstance(config, cls.config_class):
                    config = cls.config_class.from_pretrained(folder)
                verify_checkpoint(folder, config, shapes=not kwargs.get("ignore_mismatched_sizes", False),
                                  model_class=cls)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def expected_shapes(config: LLaDAConfig, model_class: type[LLaDAModelLM] = LLaDAModelLM) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the model this config describes (built on the meta device, no memory used)."""
    with torch.device("meta"):
        model = model_class(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def verify_checkpoint(
    folder: str | Path, config: LLaDAConfig, shapes: bool = True, model_class: type[LLaDAModelLM] = LLaDAModelLM
) -> None:
    """Check that the safetensors weights in `folder` are readable and (with `shapes`) are exactly the tensors
    `config` describes for `model_class`.

    Raises ValueError naming the truncated/corrupt file, the first tensor whose shape differs, or the missing /
    unexpected tensor names. Folders without safetensors files (e.g. pytorch_model.bin) are left to transformers.
    """
    found = checkpoint_shapes(Path(folder))
    if not found or not shapes:
        return
    expected = expected_shapes(config, model_class)
    for name, shape in expected.items():
        if name in found and found[name][0] != shape:
            sizes = (
                f"d_model={config.d_model}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
                f"n_kv_heads={config.n_kv_heads}, mlp_hidden_size={config.ffn_hidden_size}, "
                f"embedding_size={config.num_embeddings}"
            )
            raise ValueError(
                f"Tensor {name} in {found[name][1]} has shape {found[name][0]}, but the config ({sizes}) expects "
                f"{shape}. The config.json does not describe these weights: use the config.json saved with this "
                "checkpoint, or fix its sizes."
            )
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint in {folder} does not match its config for {model_class.__name__}: missing tensors "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}. {_mismatch_fix(model_class, config, missing, unexpected)}"
        )


def _mismatch_fix(model_class: type[LLaDAModelLM], config, missing: list[str], unexpected: list[str]) -> str:
    """What to do about missing / unexpected tensors: a dual-stream checkpoint read as LLaDA, UPS blocks the
    config places but the weights lack, or (anything else) a checkpoint that does not go with its config."""
    if not model_class.has_ups_stream and any(name.startswith("model.blocks_upm.") for name in unexpected):
        return ("These weights hold a dual-stream RemeDi (model.blocks_upm.*): load them with "
                "remedi_patches.llada.load_llada or load_backbone, which build RemeDiUPMModelLM.")
    if model_class.has_ups_stream and any(not name.startswith("model.transformer.") for name in missing):
        return (f"The config places UPS blocks after main layers {config.ups_positions}, which these weights do not "
                "hold: fix ups_positions in config.json (or delete it: it is then derived from the weights), or "
                "load a plain LLaDA checkpoint as LLaDA.")
    return "Re-download the checkpoint, or use the config.json saved with it."
