"""SMDM's bidirectional transformer (`TransEncoder`) in plain PyTorch.

Weight names and the fused-qkv layout are SMDM's, so its `iter-*-ckpt.pth` / safetensors files
load with `load_state_dict(strict=True)`:

    transformer.wte.weight                     (padded_vocab + 1, d)   row `mask_id` is [MASK]
    transformer.h.{i}.norm_1.weight            (d,)
    transformer.h.{i}.attn.attn.weight         ((n_head + 2 * groups) * hs, d)
    transformer.h.{i}.attn.proj.weight         (d, d)
    transformer.h.{i}.norm_2.weight            (d,)
    transformer.h.{i}.mlp.swiglu.w1|w2.weight  (hidden, d)   out = w3(silu(w1 x) * w2 x)
    transformer.h.{i}.mlp.swiglu.w3.weight     (d, hidden)
    transformer.ln_f.weight                    (d,)
    lm_head.weight                             (padded_vocab, d)

The fused qkv rows are grouped per query group: [q_0 .. q_{r-1}, k, v] for each of the
`n_query_groups` groups (r = n_head / n_query_groups), query head h using group h // r.
Attention is non-causal `F.scaled_dot_product_attention` (which picks flash / memory-efficient
kernels by itself on GPU when no padding mask is given). Block-diffusion decoding (DESIGN.md 10) uses the
forward's `position_ids`, `past_key_values` (a `remedi_patches.kv_cache.KVCache`) and `use_cache`: the cache
holds each layer's keys / values after RoPE, layer ids 0..n_layer-1 (the dual-stream model's UPS blocks
n_layer + j, `lit_gpt.dual_stream`). RoPE (rotate-half, base 10000) and
RMSNorm are computed in float32. Upstream's fused rotary kernel reads a cos/sin cache stored in
bfloat16 whatever the model dtype, so logits differ from upstream's by that rounding (about 1e-3
absolute on logits of magnitude 3 for a random 4-layer model at 512 positions).
"""
import json
import math
import os
import pickle
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from lit_gpt.config import Config
from remedi_patches.kv_cache import KVCache, attention_keep, current_key_mask

CONFIG_FILE = "smdm_config.json"
WEIGHTS_FILE = "model.safetensors"
_CHUNK = 1 << 26  # elements per isfinite() call, so a huge tensor needs no tensor-sized boolean copy at once

# (k, v) of this forward's tokens (B, groups, T, hs) -> the keys / values to attend to (cached ones first)
KeysValues = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def first_nonfinite(tensors) -> Optional[str]:
    """Name of the first floating tensor holding NaN or +-inf in `tensors` (a mapping or (name, tensor) pairs),
    else None."""
    items = tensors.items() if hasattr(tensors, "items") else tensors
    for name, t in items:
        if not (torch.is_tensor(t) and (t.is_floating_point() or t.is_complex())) or t.device.type == "meta":
            continue
        flat = t.detach().reshape(-1)
        if bool(torch.isfinite(flat.sum())):  # NaN / inf always reach the sum: a finite sum proves the tensor
            continue                          # finite, ~20x faster than isfinite() (an 8B model in seconds)
        for start in range(0, flat.numel(), _CHUNK):  # a non-finite sum may be an overflow: look exactly
            if not bool(torch.isfinite(flat[start:start + _CHUNK]).all()):
                return name
    return None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and returned in the input dtype."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_angles(positions: torch.Tensor, head_size: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary angles, float32, shape positions.shape + (head_size // 2,)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float32) / head_size))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (GPT-NeoX / non-interleaved). x: (B, T, nh, hs); cos, sin: (B, T, hs/2)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keep: Optional[torch.Tensor], kv: Optional[KeysValues] = None) -> torch.Tensor:
        B, T, C = x.shape
        cfg = self.config
        q_per_kv = cfg.n_head // cfg.n_query_groups
        qkv = self.attn(x).view(B, T, cfg.n_query_groups, q_per_kv + 2, cfg.head_size)
        q, k, v = qkv.split((q_per_kv, 1, 1), dim=3)
        q = q.reshape(B, T, cfg.n_head, cfg.head_size)  # (B, T, nh, hs), group-major head order
        k = k.reshape(B, T, cfg.n_query_groups, cfg.head_size)
        v = v.reshape(B, T, cfg.n_query_groups, cfg.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hs)
        if kv is not None:
            k, v = kv(k, v)  # (B, groups, Lc + T, hs): the cached keys first
        if q_per_kv > 1:
            k = k.repeat_interleave(q_per_kv, dim=1)
            v = v.repeat_interleave(q_per_kv, dim=1)
        attn_bias = None
        if keep is not None:  # additive bias; a finite minimum keeps an all-padding row NaN-free
            attn_bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
            attn_bias = attn_bias.masked_fill(~keep, torch.finfo(q.dtype).min)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=False,
                                           scale=1.0 / math.sqrt(cfg.head_size))
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), xformers' unpacked SwiGLU weight names."""

    def __init__(self, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(n_embd, hidden, bias=False)
        self.w2 = nn.Linear(n_embd, hidden, bias=False)
        self.w3 = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LLaMAMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.swiglu = SwiGLU(config.n_embd, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swiglu(x)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm_1 x), then + mlp(norm_2 x). FSDP wraps one per unit."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = SelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = LLaMAMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keep: Optional[torch.Tensor], kv: Optional[KeysValues] = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, keep, kv)
        return x + self.mlp(self.norm_2(x))


@dataclass
class AttentionInputs:
    """What every attention layer of one forward shares: RoPE angles, the keys to attend to, the KV cache."""
    cos: torch.Tensor             # (B, T, hs/2)
    sin: torch.Tensor             # (B, T, hs/2)
    keep: Optional[torch.Tensor]  # (B, 1, 1|T, Lc + T) bool, True = attend; None = every key
    cache: Optional[KVCache]
    written: Optional[torch.Tensor]  # (B, T) bool: real tokens appended to the cache by finish(); None = read only

    def args(self, layer_id: int) -> tuple:
        """The arguments after x of `Block.forward` for attention layer `layer_id`."""
        kv = None if self.cache is None else partial(self.cache.keys_values, layer_id, write=self.written is not None)
        return self.cos, self.sin, self.keep, kv

    def finish(self) -> None:
        """After the last layer: record which of the positions just written to the cache are real tokens."""
        if self.written is not None:
            self.cache.extend(self.written)


def default_positions(attention_mask: Optional[torch.Tensor], cache: Optional[KVCache], batch: int, length: int,
                      device: torch.device) -> torch.Tensor:
    """(B, T) RoPE positions counting real tokens only: the cached real tokens, then those of the (B, T) key mask
    (cumsum - 1, clamped at 0; every current token when the mask is absent or 4-D)."""
    real = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    positions = (current_key_mask(real, batch, length, device).long().cumsum(-1) - 1).clamp(min=0)
    if cache is not None and len(cache):
        positions = positions + cache.key_mask.sum(-1, keepdim=True)
    return positions


class TransEncoder(nn.Module):
    """Bidirectional mask predictor: token ids (B, T) -> logits (B, T, padded_vocab_size).

    `attention_mask` (B, T) of 1/0: keys with 0 are ignored and positions count only real tokens
    (cumsum - 1, clamped at 0), so a left-padded row gives the same logits at its real positions
    as the row alone. The last hidden state is the output of `transformer.ln_f` (hook it).
    Block-diffusion decoding: see `forward`.
    """
    has_ups_stream = False  # the dual-stream RemeDiTransEncoder (lit_gpt.dual_stream) has its own UPS
    # recompute every block in backward instead of keeping its activations (lit_gpt.training's
    # apply_gradient_checkpointing sets it; see `run_block`)
    gradient_checkpointing = False

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.ups_positions is not None and not self.has_ups_stream:
            raise ValueError(f"SMDM config {config.name!r} has ups_positions={config.ups_positions} (a dual-stream "
                             "RemeDi): build it with lit_gpt.model.build_model(config), or drop ups_positions")
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size + 1, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.reset_parameters()

    @classmethod
    def from_name(cls, name: str, **overrides) -> "TransEncoder":
        return cls(Config.from_name(name, **overrides))

    def reset_parameters(self) -> None:
        smdm_init_(self, self.config)

    def attention_inputs(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor],
                         position_ids: Optional[torch.Tensor], past_key_values: Optional[KVCache],
                         use_cache: bool) -> AttentionInputs:
        """Check the forward's inputs against each other and the context; RoPE angles, key mask and cache use."""
        B, T = idx.shape
        cached = 0 if past_key_values is None else len(past_key_values)
        if past_key_values is not None and past_key_values.window is not None:
            cached -= T  # the current tokens overwrite cached positions (KVCache.replacing)
        if cached + T > self.config.block_size:
            raise ValueError(f"Sequence length {T}{f' + {cached} cached' if cached else ''} exceeds block_size "
                             f"{self.config.block_size}; crop the input or build the config with a larger block_size.")
        if use_cache and past_key_values is None:
            raise ValueError("use_cache=True needs past_key_values=KVCache() to write the keys / values into")
        if attention_mask is not None:
            attention_mask = attention_mask.to(idx.device)
        keep = attention_keep(attention_mask, past_key_values, B, T)
        written = current_key_mask(attention_mask, B, T, idx.device) if use_cache else None  # refuses a 4-D mask
        if position_ids is None:
            position_ids = default_positions(attention_mask, past_key_values, B, T, idx.device)
        elif tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected (batch, length) = "
                             f"{(B, T)}")
        cos, sin = rope_angles(position_ids.to(idx.device), self.config.head_size, self.config.rope_base)
        return AttentionInputs(cos, sin, keep, past_key_values, written)

    def run_block(self, block: Block, x: torch.Tensor, step: AttentionInputs, layer_id: int) -> torch.Tensor:
        """`block` on x (B, T, d) as attention layer `layer_id`. With `gradient_checkpointing`, while training
        with gradients and writing no KV cache (a recompute would write it twice), its activations are not kept
        but recomputed in backward (non-reentrant torch.utils.checkpoint: same loss and gradients)."""
        args = step.args(layer_id)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and step.written is None:
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False) -> torch.Tensor:
        """Logits (B, T, padded_vocab) of token ids `idx` (B, T).

        attention_mask: None; (B, T) 1/0 (0 = padding, never attended); or (B, 1, T, Lc + T) bool, True = attend,
        over [cached | current] (e.g. a block-causal mask). position_ids (B, T): explicit RoPE positions (default:
        real tokens counted, the cached ones first). past_key_values: the tokens also attend to the cached keys
        of real tokens; use_cache=True appends this forward's keys / values (after RoPE) to it.
        """
        step = self.attention_inputs(idx, attention_mask, position_ids, past_key_values, use_cache)
        x = self.transformer.wte(idx)  # (B, T, d)
        for i, block in enumerate(self.transformer.h):
            x = self.run_block(block, x, step, i)
        step.finish()
        x = self.transformer.ln_f(x)
        return self.lm_head(x)  # (B, T, padded_vocab)


def smdm_init_(model: nn.Module, config: Config) -> None:
    """SMDM's initialisation of every submodule of `model`: N(0, 2/(5d)) for embeddings and linears, residual
    outputs (attn.proj, swiglu.w3) N(0, (1/(sqrt(d) * n_layer))^2), norms 1."""
    d, n_layer = config.n_embd, config.n_layer
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual_out = name.endswith(("attn.proj", "swiglu.w3"))
            std = 1.0 / math.sqrt(d) / n_layer if residual_out else math.sqrt(2.0 / 5 / d)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            module.reset_parameters()


def build_model(config: Config) -> TransEncoder:
    """The model `config` describes: `TransEncoder`, or the dual-stream `RemeDiTransEncoder` when it has
    ups_positions."""
    if config.ups_positions is None:
        return TransEncoder(config)
    from lit_gpt.dual_stream import RemeDiTransEncoder  # it imports this module

    return RemeDiTransEncoder(config)


def load_weights(model: TransEncoder, path: Union[str, Path]) -> None:
    """Load SMDM weights into `model` strictly, from any of the forms SMDM users hold:
    an `smdm` folder (`model.safetensors`), a `.safetensors` file, or a torch checkpoint
    (`iter-*-ckpt.pth` holding {"model": state_dict, ...}, or a bare state dict).

    Torch files are read with `weights_only=True` (no code runs). A missing, truncated or
    mismatching file raises one FileNotFoundError / ValueError naming the file and the fix.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No SMDM weights at {path}: pass an smdm folder, a .safetensors file "
                                "or an iter-*-ckpt.pth checkpoint.")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects other than tensors and plain values, refused for safety "
                         f"({e}); export its state dict to safetensors first.") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"SMDM weights file {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                         "re-download or re-export it, or use an earlier checkpoint.") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape_errors = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shape_errors:
        raise ValueError(
            f"Weights in {path} do not fit SMDM config {model.config.name!r}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatches {shape_errors[:5]}. {_streams_hint(missing, unexpected)}")
    bad = first_nonfinite(state)
    if bad is not None:
        raise ValueError(f"SMDM weights file {path}: tensor {bad!r} holds NaN or inf values (the run that wrote it "
                         "diverged); use an earlier checkpoint, or retrain with a lower learning rate.")
    model.load_state_dict(state, strict=True)


def _streams_hint(missing: list[str], unexpected: list[str]) -> str:
    """The fix for weights that do not fit: a single- vs dual-stream mix-up is named as such."""
    if missing and all(k.startswith("ups.") for k in missing) and not unexpected:
        return ("The file holds a single-stream TransEncoder and the model is a dual-stream RemeDi: load it into a "
                "TransEncoder and add the UPS with lit_gpt.dual_stream.remedi_from_backbone.")
    if unexpected and all(k.startswith("ups.") for k in unexpected) and not missing:
        return ("The file holds a dual-stream RemeDi (ups.* tensors): build the model with the config's "
                "ups_positions (lit_gpt.model.build_model), or load its folder, whose smdm_config.json records them.")
    return "Build the model with the config the weights were trained with."


def save_smdm_folder(model: TransEncoder, path: Union[str, Path]) -> Path:
    """Write `smdm_config.json` (the Config fields) and `model.safetensors` into folder `path` (write_model_folder:
    NaN / inf refused, every file atomic)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    return write_model_folder(path, state, config, "an SMDM model", WEIGHTS_FILE, CONFIG_FILE,
                              metadata={"smdm_config": json.dumps(config)})


def write_model_folder(path: Union[str, Path], state: dict, config: dict, what: str, weights_file: str,
                       config_file: str, metadata: Optional[dict] = None,
                       before_config: Optional[Callable[[Path], None]] = None) -> Path:
    """A model export folder: `weights_file` (safetensors of `state`, with `metadata`), then whatever
    `before_config(path)` writes (a tokenizer), then `config_file` (`config` as JSON) last, so a loader that
    recognises the folder by its config never sees half of it. A state holding NaN or inf is refused (ValueError
    naming `what` and the tensor) before anything is written. Each file is written to a temporary name unique to this
    process in the same folder and renamed, so an interrupted or concurrent export never leaves a half-written file
    under the final name."""
    bad = first_nonfinite(state)
    if bad is not None:
        raise ValueError(f"refusing to save {what} to {path}: tensor {bad!r} holds NaN or inf values (training "
                         "diverged); save an earlier checkpoint, or retrain with a lower learning rate.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_atomically(path / weights_file, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt",
                                                                                            **(metadata or {})}))
    if before_config is not None:
        before_config(path)
    _write_atomically(path / config_file, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return path


def _write_atomically(target: Path, write) -> None:
    """write(tmp) to a temporary file unique to this process beside `target`, then rename it to `target`."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def load_smdm_config(path: Union[str, Path]) -> Config:
    """The Config in `smdm_config.json` of an SMDM folder written by `save_smdm_folder`."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {path} is not an SMDM export folder "
                                "(make one with lit_gpt.model.save_smdm_folder or train_mdm.py --export_dir).")
    try:
        return Config.from_dict(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); re-export the folder.") from None


def load_smdm_folder(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                     dtype: Optional[torch.dtype] = None) -> TransEncoder:
    """Rebuild the model (`build_model`: single or dual stream, as its config says) from a folder written by
    `save_smdm_folder` (strict load)."""
    config = load_smdm_config(path)
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device="cpu")
    load_weights(model, path)
    return model.to(device=device, dtype=dtype)
