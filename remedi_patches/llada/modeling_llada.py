"""Native LLaDA backbone: a transformers model whose weights load from GSAI-ML/LLaDA-8B checkpoints.

Architecture (the upstream "llama" block of LLaDA, non-causal):

    x = wte(ids)
    per block:  h = attn_norm(x);  x = x + attn_out(SDPA(rope(q_proj h), rope(k_proj h), v_proj h, key padding bias))
                h = ff_norm(x);    x = x + ff_out(silu(ff_proj h) * up_proj h)
    logits = ff_out(ln_f(x))       (wte.weight instead when weight_tying)

RMSNorm normalises in float32; RoPE (rotate-half form, theta = rope_theta) is computed and applied in
float32 whatever the model dtype. Weight names are those of the upstream checkpoint
(`model.transformer.blocks.{i}.q_proj.weight`, ...), so `from_pretrained` reads them unchanged.
"""

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

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


def default_position_ids(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(B, L) positions counting real tokens only (a left-padded row gets its positions from alone), else arange."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
    """Additive attention bias (B, 1, 1, L): 0 for real keys, the dtype's min (finite, so no NaN) for padding."""
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~key_mask, torch.finfo(dtype).min
    )


class LLaDABlock(GradientCheckpointingLayer):
    """The upstream "llama" block: pre-norm non-causal attention with RoPE, then a SwiGLU MLP."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        cfg = self.config
        B, L, d = x.shape
        n_kv = cfg.effective_n_kv_heads
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(h).view(B, L, n_kv, cfg.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.v_proj(h).view(B, L, n_kv, cfg.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, cfg.rope_full_precision)
        k = apply_rope(k, cos, sin, cfg.rope_full_precision)
        att = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if key_mask is None else padding_bias(key_mask, q.dtype),
            dropout_p=cfg.attention_dropout if self.training else 0.0,
            is_causal=False,
            enable_gqa=n_kv != cfg.n_heads,
        )  # (B, H, L, hd)
        att = att.transpose(1, 2).reshape(B, L, d)
        x = x + F.dropout(self.attn_out(att), cfg.residual_dropout, self.training)
        h = self.ff_norm(x)
        mlp = self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x + F.dropout(mlp, cfg.residual_dropout, self.training)


class LLaDAModel(nn.Module):
    """The body under `model.`: `transformer.{wte, blocks, ln_f, ff_out}` exactly as in the upstream checkpoint."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        modules = {
            "wte": nn.Embedding(config.num_embeddings, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
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
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        cfg = self.config
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, d)
        x = F.dropout(x, cfg.embedding_dropout, self.training)
        B, L = x.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, B, L, x.device)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        # all-ones masks are dropped so SDPA may take its mask-free fast kernels
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        hidden = []
        for block in self.transformer.blocks:
            if output_hidden_states:
                hidden.append(x)
            x = block(x, cos, sin, key_mask)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden.append(x)
        head = self.transformer.wte.weight if cfg.weight_tying else self.transformer.ff_out.weight
        bias = None if cfg.weight_tying else self.transformer.ff_out.bias
        logits = F.linear(x, head, bias)  # (B, L, embedding_size)
        return logits, tuple(hidden) if output_hidden_states else None


class LLaDAModelLM(PreTrainedModel):
    """LLaDA as a transformers model (`model_type="llada"`, architecture name "LLaDAModelLM")."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        check_supported(config)
        super().__init__(config)
        self.model = LLaDAModel(config)
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
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """logits (B, L, V); with output_hidden_states the input of every block, then the output of ln_f.

        attention_mask (B, L) of 1/0: keys at 0 are ignored. Without position_ids, positions count real
        tokens only, so a left-padded row gives the same logits as the row alone.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LLaDAModelLM.forward needs exactly one of input_ids or inputs_embeds.")
        if labels is not None:
            raise ValueError(
                "LLaDAModelLM computes no loss: a masked-diffusion loss depends on the noise, so compute it from "
                ".logits (e.g. remedi_patches.losses.tps_loss) and do not pass labels."
            )
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache") or kwargs.get("output_attentions"):
            raise ValueError(
                "LLaDA is a bidirectional diffusion LM: it has no KV cache and does not return attentions; "
                "drop past_key_values / use_cache / output_attentions."
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        logits, hidden_states = self.model(input_ids, inputs_embeds, attention_mask, position_ids, output_hidden_states)
        out = CausalLMOutputWithPast(logits=logits, hidden_states=hidden_states)
        return out if return_dict else out.to_tuple()

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
                if not isinstance(config, LLaDAConfig):
                    config = LLaDAConfig.from_pretrained(folder)
                verify_checkpoint(folder, config, shapes=not kwargs.get("ignore_mismatched_sizes", False))
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def expected_shapes(config: LLaDAConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the model this config describes (built on the meta device, no memory used)."""
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a saved model (one file, or the shards named by the index); [] if none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"{index} is not a valid safetensors index ({err!r}): re-download it or re-save the model."
            ) from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {index.name} but missing: re-download the checkpoint.")
        return files
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def verify_checkpoint(folder: str | Path, config: LLaDAConfig, shapes: bool = True) -> None:
    """Check that the safetensors weights in `folder` are readable and (with `shapes`) are exactly the tensors
    `config` describes.

    Raises ValueError naming the truncated/corrupt file, the first tensor whose shape differs, or the missing /
    unexpected tensor names. Folders without safetensors files (e.g. pytorch_model.bin) are left to transformers.
    """
    files = _safetensors_files(Path(folder))
    if not files:
        return
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    found[name] = (tuple(f.get_slice(name).get_shape()), path.name)
        except SafetensorError as err:
            raise ValueError(
                f"{path} is truncated or corrupt ({err}). Re-download it, or re-save the model with "
                "save_pretrained."
            ) from err
    if not shapes:
        return
    expected = expected_shapes(config)
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
            f"The checkpoint in {folder} does not match its LLaDA config: missing tensors {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}. Re-download the checkpoint, or use the config.json saved "
            "with it."
        )


def load_llada(path: str | Path, **kwargs) -> LLaDAModelLM:
    """Load a LLaDA checkpoint (local folder or hub name) strictly; `kwargs` go to `from_pretrained` (dtype, ...).

    Local folders are verified before loading (see `verify_checkpoint`); for downloaded or non-safetensors
    checkpoints the loading report is checked afterwards. Every problem is one ValueError naming it.
    `ignore_mismatched_sizes=True` keeps transformers' meaning: tensors whose shapes differ are re-initialised.
    """
    try:
        model, info = LLaDAModelLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except SafetensorError as err:
        raise ValueError(
            f"A weights file of {path} is truncated or corrupt ({err}): delete it and download it again."
        ) from err
    except RuntimeError as err:
        if "mismatch" not in str(err):
            raise
        raise ValueError(
            f"The weights of {path} do not have the shapes its config.json describes (see the load report "
            "above for the tensor names): use the config.json saved with these weights."
        ) from err
    strict = ["missing_keys", "unexpected_keys"]
    if not kwargs.get("ignore_mismatched_sizes"):
        strict.append("mismatched_keys")
    problems = {key: sorted(map(str, info[key])) for key in strict}
    problems = {key: names for key, names in problems.items() if names}
    if problems:
        raise ValueError(
            f"Loading {path} is not exact: {problems}. Re-download the checkpoint, or use the config.json saved "
            "with it."
        )
    return model
