"""Native SEDD (score-entropy discrete diffusion) transformer: pure PyTorch, weights load from the upstream checkpoints.

Architecture (a DiT-style "DDiT" conditioned on the total noise sigma, non-causal, no padding support):

    x = vocab_embed.embedding[indices]                                   (B, L, H)
    c = silu(sigma_map(sigma))          sinusoid(256) -> Linear -> SiLU -> Linear   (B, C)
    per block:  shift1, scale1, gate1, shift2, scale2, gate2 = adaLN_modulation(c)
                x = x + gate1 * dropout(attn_out(SDPA(rope(q), rope(k), v)))  with q, k, v from
                    attn_qkv(norm1(x) * (1 + scale1) + shift1)
                x = x + gate2 * dropout(mlp(norm2(x) * (1 + scale2) + shift2))
    out = output_layer.linear(norm_final(x) * (1 + scale) + shift)     (B, L, V)
    absorb + scale_by_sigma:  out -= log(e^sigma - 1) + log(V - 1)
    out[b, i, indices[b, i]] = 0                                           the log score of "stay"

LayerNorms (weight only) normalise in float32; rotary (NeoX rotate-half, base 1e4) rotates q and k, in float32.
Everything runs in the parameters' dtype unless `autocast_dtype` is set (upstream trains and samples under bf16
autocast: `model.autocast_dtype = torch.bfloat16`). Module names are the upstream state-dict keys
(`vocab_embed.embedding`, `blocks.{i}.attn_qkv.weight`, `output_layer.linear.bias`, ...), so an upstream
checkpoint loads with strict=True.
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

GRAPHS = ("absorb", "uniform")
NOISES = ("loglinear", "geometric")
SIGMA_FREQUENCIES = 256  # width of the sinusoidal sigma embedding
SIGMA_MAX_PERIOD = 10_000.0
ROTARY_BASE = 10_000.0
GPT2_TOKENS = 50257


@dataclass
class SEDDConfig:
    """The fields of an upstream SEDD hydra config the model needs (`model.*`, `tokens`, `graph.type`, `noise.*`).

    `extra` keeps every other key of the upstream dict (training, data, optim, ...) so that
    `from_upstream_dict(d).to_upstream_dict()` gives `d` back."""
    hidden_size: int = 768
    n_heads: int = 12
    n_blocks: int = 12
    cond_dim: int = 128
    length: int = 1024                # positions the model was trained on (its context)
    dropout: float = 0.1
    tokens: int = GPT2_TOKENS         # tokenizer vocabulary (without the absorbing [MASK])
    graph: str = "absorb"             # "absorb" | "uniform"
    noise: str = "loglinear"          # "loglinear" | "geometric"
    sigma_min: float = 1e-4           # geometric noise range (upstream keeps them in the config for both types)
    sigma_max: float = 20.0
    scale_by_sigma: bool = True       # absorb only
    name: str = "small"
    model_type: str = "ddit"
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.graph not in GRAPHS:
            raise ValueError(f"SEDD graph.type {self.graph!r} is not one of {GRAPHS}")
        if self.noise not in NOISES:
            raise ValueError(f"SEDD noise.type {self.noise!r} is not one of {NOISES}")
        if self.model_type != "ddit":
            raise ValueError(f"SEDD model.type {self.model_type!r}: only the 'ddit' transformer is implemented")
        if self.hidden_size % self.n_heads or (self.hidden_size // self.n_heads) % 2:
            raise ValueError(f"SEDD hidden_size {self.hidden_size} must split into {self.n_heads} heads of an even "
                             "width (rotary rotates pairs)")

    # ----------------------------------------------------------- what the project reads
    @property
    def vocab_size(self) -> int:
        """Rows of the embedding / columns of the output: tokens + 1 ([MASK]) for absorb, tokens for uniform."""
        return self.tokens + 1 if self.graph == "absorb" else self.tokens

    @property
    def mask_token_id(self) -> Optional[int]:
        """The absorbing state's id (= tokens), None for the uniform graph (it has no mask)."""
        return self.tokens if self.graph == "absorb" else None

    @property
    def max_length(self) -> int:
        return self.length

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    # ----------------------------------------------------------- upstream hydra dict
    @classmethod
    def from_upstream_dict(cls, d: dict) -> "SEDDConfig":
        """Read an upstream config dict (config.json of a hub folder, or a run's .hydra/config.yaml)."""
        missing = [key for key in ("tokens", "graph", "noise", "model") if key not in d]
        if missing:
            raise ValueError(f"not an upstream SEDD config: it lacks the key(s) {missing} (expected tokens, "
                             "graph.type, noise.*, model.*)")
        model, graph, noise = dict(d["model"]), dict(d["graph"]), dict(d["noise"])
        need = [f"model.{k}" for k in ("hidden_size", "n_heads", "n_blocks", "cond_dim", "length") if k not in model]
        need += ["graph.type"] if "type" not in graph else []
        need += ["noise.type"] if "type" not in noise else []
        if need:
            raise ValueError(f"upstream SEDD config lacks {need}")
        extra = copy.deepcopy({k: v for k, v in d.items() if k not in ("tokens", "graph", "noise", "model")})
        extra["_graph"] = {k: v for k, v in graph.items() if k != "type"}
        extra["_noise"] = {k: v for k, v in noise.items() if k not in ("type", "sigma_min", "sigma_max")}
        extra["_model"] = {k: v for k, v in model.items() if k not in _MODEL_KEYS}
        return cls(hidden_size=int(model["hidden_size"]), n_heads=int(model["n_heads"]),
                   n_blocks=int(model["n_blocks"]), cond_dim=int(model["cond_dim"]), length=int(model["length"]),
                   dropout=float(model.get("dropout", 0.1)), tokens=int(d["tokens"]), graph=str(graph["type"]),
                   noise=str(noise["type"]), sigma_min=float(noise.get("sigma_min", 1e-4)),
                   sigma_max=float(noise.get("sigma_max", 20.0)),
                   scale_by_sigma=bool(model.get("scale_by_sigma", True)), name=str(model.get("name", "custom")),
                   model_type=str(model.get("type", "ddit")), extra=extra)

    def to_upstream_dict(self) -> dict:
        """The upstream hydra-style dict (what upstream's hub config.json holds), extra keys included."""
        extra = copy.deepcopy(self.extra)
        graph, noise, model = extra.pop("_graph", {}), extra.pop("_noise", {}), extra.pop("_model", {})
        return {
            **extra,
            "tokens": self.tokens,
            "graph": {"type": self.graph, **graph},
            "noise": {"type": self.noise, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, **noise},
            "model": {"name": self.name, "type": self.model_type, "hidden_size": self.hidden_size,
                      "cond_dim": self.cond_dim, "length": self.length, "n_blocks": self.n_blocks,
                      "n_heads": self.n_heads, "scale_by_sigma": self.scale_by_sigma, "dropout": self.dropout,
                      **model},
        }

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "extra"}


_MODEL_KEYS = ("name", "type", "hidden_size", "cond_dim", "length", "n_blocks", "n_heads", "scale_by_sigma",
               "dropout")


def sedd_small(**overrides) -> SEDDConfig:
    """louaaron/sedd-small: 12 blocks of width 768, 12 heads (169,627,218 parameters with GPT-2's vocabulary)."""
    return SEDDConfig(**{"name": "small", "hidden_size": 768, "n_heads": 12, "n_blocks": 12, **overrides})


def sedd_medium(**overrides) -> SEDDConfig:
    """louaaron/sedd-medium: 24 blocks of width 1024, 16 heads (424,477,010 parameters)."""
    return SEDDConfig(**{"name": "medium", "hidden_size": 1024, "n_heads": 16, "n_blocks": 24, **overrides})


# ---------------------------------------------------------------- kernels


def sigma_sinusoid(sigma: torch.Tensor, dim: int = SIGMA_FREQUENCIES,
                   max_period: float = SIGMA_MAX_PERIOD) -> torch.Tensor:
    """(B,) -> (B, dim) float32: [cos(sigma * f_k), sin(sigma * f_k)] with f_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[:, None] * freqs[None]                                          # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                         # (B, dim)


def rotary_inv_freq(head_dim: int, base: float = ROTARY_BASE) -> torch.Tensor:
    """(head_dim / 2,) float32 inverse frequencies base^(-2k / head_dim)."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, heads, D) rotated in float32 by cos / sin (L, D); returned in x's dtype."""
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, H) * (1 + scale) + shift, shift / scale (B, H)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def gated_residual(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, p: float,
                   training: bool) -> torch.Tensor:
    """residual + gate (B, H) * dropout(x)."""
    return residual + gate[:, None] * F.dropout(x, p=p, training=training)


# ---------------------------------------------------------------- modules


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, normalised in float32 (outside any autocast); returned in x's dtype
    (float32 under autocast with float32 parameters, as upstream)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), [self.dim]) * self.weight.float()[None, None, :]
        return out.to(x.dtype)


class EmbeddingLayer(nn.Module):
    """The input embedding: a raw (V, H) Parameter named `embedding` (untied from the output layer)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding[indices]                                                   # (B, L, H)


class SigmaEmbedder(nn.Module):
    """sigma (B,) -> (B, cond): the 256-wide sinusoid through Linear -> SiLU -> Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, cond_dim: int, frequencies: int = SIGMA_FREQUENCIES):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        emb = sigma_sinusoid(sigma, self.frequencies)                                    # (B, 256) float32
        return self.mlp(emb.to(self.mlp[0].weight.dtype))                                # (B, cond)


class Rotary(nn.Module):
    """Holds `inv_freq` (a persistent buffer: upstream checkpoints carry it) and makes cos / sin per position."""

    def __init__(self, head_dim: int, base: float = ROTARY_BASE):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, base), persistent=True)

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq  # model.to(bfloat16) rounds the buffer too: positions far out would drift
        inv_freq = inv_freq if inv_freq.dtype == torch.float32 else rotary_inv_freq(self.head_dim, self.base)
        t = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(device))                                      # (L, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)                                          # (L, D)
        return emb.cos(), emb.sin()


class DDiTBlock(nn.Module):
    """One adaLN transformer block (full bidirectional attention, no mask)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.dropout2 = nn.Dropout(dropout)
        self.dropout = dropout
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], c: torch.Tensor) -> torch.Tensor:
        B, L, H = x.shape
        heads, D = self.n_heads, H // self.n_heads
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)

        h = modulate(self.norm1(x), shift_msa, scale_msa)                                # (B, L, H)
        qkv = self.attn_qkv(h).view(B, L, 3, heads, D)                                   # (three, heads, head_dim)
        cos, sin = rotary
        q = apply_rotary(qkv[:, :, 0], cos, sin).transpose(1, 2)                         # (B, heads, L, D)
        k = apply_rotary(qkv[:, :, 1], cos, sin).transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=D ** -0.5)
        attn = attn.transpose(1, 2).reshape(B, L, H)                                     # (B, L, H)
        x = gated_residual(x, self.attn_out(attn), gate_msa, self.dropout, self.training)

        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return gated_residual(x, self.mlp(h), gate_mlp, self.dropout, self.training)     # (B, L, H)


class DDiTFinalLayer(nn.Module):
    """adaLN (shift, scale) -> norm_final -> linear (H -> V, with bias)."""

    def __init__(self, dim: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))                   # (B, L, V)


class SEDD(nn.Module):
    """The SEDD score network: `forward(indices (B, L) long, sigma (B,)) -> log_score (B, L, V)`."""

    def __init__(self, config: SEDDConfig):
        super().__init__()
        self.config = config
        self.autocast_dtype: Optional[torch.dtype] = None  # e.g. torch.bfloat16: run the blocks under autocast
        H, V = config.hidden_size, config.vocab_size
        self.vocab_embed = EmbeddingLayer(V, H)
        self.sigma_map = SigmaEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(config.head_dim)
        self.blocks = nn.ModuleList(
            DDiTBlock(H, config.n_heads, config.cond_dim, dropout=config.dropout) for _ in range(config.n_blocks))
        self.output_layer = DDiTFinalLayer(H, V, config.cond_dim)
        self.reset_adaln()

    def reset_adaln(self) -> None:
        """adaLN-Zero initialisation (the DiT convention): every modulation and the output linear start at zero,
        so a fresh model's blocks are identities. Loading a checkpoint overwrites all of it."""
        for module in [b.adaLN_modulation for b in self.blocks] + [self.output_layer.adaLN_modulation,
                                                                   self.output_layer.linear]:
            if module.weight.device.type != "meta":
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def max_length(self) -> int:
        return self.config.length

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(self, indices: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 2:
            raise ValueError(f"SEDD takes indices of shape (batch, length); got {tuple(indices.shape)}")
        B, L = indices.shape
        if sigma.dim() == 0:
            sigma = sigma.expand(B)
        sigma = sigma.reshape(B)
        x = self.vocab_embed(indices)                                                    # (B, L, H)
        c = F.silu(self.sigma_map(sigma))                                                # (B, cond)
        rotary = self.rotary_emb(L, indices.device)                                      # (L, D) x 2
        with self._autocast(indices.device):
            for block in self.blocks:
                x = block(x, rotary, c)                                                  # (B, L, H)
            x = self.output_layer(x, c)                                                  # (B, L, V)
        if self.config.scale_by_sigma and self.config.graph == "absorb":
            sig = sigma.float()
            esigm1 = torch.where(sig < 0.5, torch.expm1(sig), sig.exp() - 1)             # (B,)
            x = x - esigm1.log().to(x.dtype)[:, None, None] - math.log(x.shape[-1] - 1)
        # the log score of staying at one's own token is 0 (ratio 1)
        return torch.scatter(x, -1, indices[..., None], torch.zeros_like(x[..., :1]))    # (B, L, V)


def sedd_state_dict_keys(config: SEDDConfig) -> list[str]:
    """The upstream checkpoint's tensor names for `config`, in `model.parameters()` order plus `rotary_emb.inv_freq`."""
    with torch.device("meta"):
        return list(SEDD(config).state_dict().keys())
