"""Model configuration of SMDM's masked-diffusion transformer (`Diff_LLaMA_<N>M`).

All upstream sizes share the LLaMA recipe: pre-norm RMSNorm blocks, SwiGLU MLP, full rotary
embeddings (base 10000), no biases, TinyLlama vocabulary (32000 tokens, padded to a multiple
of 64), context 2048. The mask token is `vocab_size` (32000 upstream); the embedding has
`padded_vocab_size + 1` rows so the mask id always has a row, the head `padded_vocab_size`
outputs. `ups_positions` (main-layer indices) makes the model the dual-stream RemeDi of
`lit_gpt.dual_stream`: one UPS block after each of those layers; None (the default, and every
`smdm_config.json` written before it existed) is the single-stream TransEncoder.
"""
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of `k` that is >= `n`."""
    return n if n % k == 0 else n + k - n % k


@dataclass
class Config:
    name: str = "Diff_LLaMA_tiny"
    block_size: int = 2048
    vocab_size: int = 32000
    padding_multiple: int = 64
    padded_vocab_size: Optional[int] = None
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    n_query_groups: Optional[int] = None  # None -> n_head (MHA); 1 -> MQA; between -> GQA
    intermediate_size: int = 256
    norm_eps: float = 1e-5
    rope_base: int = 10000
    ups_positions: Optional[list[int]] = None  # dual-stream RemeDi: UPS block j after main layer ups_positions[j]

    def __post_init__(self) -> None:
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        sizes = ("block_size", "vocab_size", "padding_multiple", "n_layer", "n_head", "n_embd", "n_query_groups",
                 "intermediate_size")
        problems = [f"{name}={getattr(self, name)} must be a positive integer" for name in sizes
                    if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0)]
        if problems:
            raise ValueError(f"Invalid SMDM config {self.name!r}: " + "; ".join(problems) + ". Fix these fields.")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = find_multiple(self.vocab_size, self.padding_multiple)
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        elif self.head_size % 2:
            problems.append(f"head size n_embd/n_head={self.head_size} must be even for rotary embeddings")
        if self.n_head % self.n_query_groups:
            problems.append(f"n_head={self.n_head} is not divisible by n_query_groups={self.n_query_groups}")
        if self.padded_vocab_size < self.vocab_size:
            problems.append(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")
        if self.ups_positions is not None:
            if isinstance(self.ups_positions, tuple):  # a tuple and its JSON round trip compare equal
                self.ups_positions = list(self.ups_positions)
            layers = self.ups_positions
            in_range = isinstance(layers, list) and all(isinstance(b, int) and 0 <= b < self.n_layer for b in layers)
            if not (layers and in_range and all(a < b for a, b in zip(layers, layers[1:]))):
                problems.append(f"ups_positions={layers} must be a non-empty, strictly increasing list of main-layer "
                                f"indices in [0, n_layer={self.n_layer}) (or None for a single-stream model)")
        if problems:
            raise ValueError(f"Invalid SMDM config {self.name!r}: " + "; ".join(problems) + ". Fix these fields.")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mask_id(self) -> int:
        """Token id of [MASK]: the first id after the real vocabulary (32000 for TinyLlama)."""
        return self.vocab_size

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """Config of a named size (`Diff_LLaMA_170M`, ...), with field overrides.

        Raises ValueError for an unknown name (listing the valid ones) or an unknown field.
        """
        if name not in name_to_config:
            raise ValueError(f"Unknown SMDM model name {name!r}. Valid names: {', '.join(name_to_config)}")
        return cls.from_dict({**name_to_config[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown SMDM config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def num_non_embedding_params(config: Config) -> int:
    """Parameters outside `wte` and `lm_head`: the `N` of SMDM's scaling laws and `--flops` budget."""
    qkv = config.n_embd * (config.n_head + 2 * config.n_query_groups) * config.head_size
    proj = config.n_embd * config.n_embd
    mlp = 3 * config.n_embd * config.intermediate_size
    norms = 2 * config.n_embd
    return config.n_layer * (qkv + proj + mlp + norms) + config.n_embd


def _diff_llama(n_million: int, n_layer: int, n_head: int, n_embd: int) -> dict:
    # every upstream size uses MHA (n_query_groups = n_head) and a 4x MLP, except 75M (see below)
    return dict(name=f"Diff_LLaMA_{n_million}M", n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                n_query_groups=n_head, intermediate_size=4 * n_embd)


_UPSTREAM = [
    # (N in millions of non-embedding params, n_layer, n_head, n_embd)
    (6, 6, 4, 256), (19, 8, 6, 384), (34, 8, 8, 512), (48, 9, 9, 576), (66, 10, 10, 640),
    (85, 13, 10, 640), (113, 12, 12, 768), (142, 15, 12, 768), (170, 18, 12, 768),
    (180, 14, 14, 896), (206, 16, 14, 896), (231, 18, 14, 896), (268, 16, 16, 1024),
    (302, 18, 16, 1024), (336, 20, 16, 1024), (472, 18, 10, 1280), (551, 21, 10, 1280),
    (571, 18, 11, 1408), (629, 24, 10, 1280), (666, 21, 11, 1408), (717, 19, 12, 1536),
    (761, 24, 11, 1408), (831, 22, 12, 1536), (944, 25, 12, 1536), (1028, 20, 14, 1792),
    (1233, 24, 14, 1792), (1476, 22, 16, 2048), (1678, 25, 16, 2048), (2121, 28, 17, 2176),
]

configs = [_diff_llama(*row) for row in _UPSTREAM]
# 75M is the one upstream size with a narrower MLP (2.5x)
configs.append(dict(name="Diff_LLaMA_75M", n_layer=16, n_head=8, n_embd=640, n_query_groups=8,
                    intermediate_size=1600))
# tiny sizes for tests and CPU runs (not upstream)
configs += [
    dict(name="Diff_LLaMA_tiny", n_layer=2, n_head=2, n_embd=64, intermediate_size=256),
    dict(name="Diff_LLaMA_tiny_gqa", n_layer=2, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=256),
    dict(name="Diff_LLaMA_small", n_layer=4, n_head=4, n_embd=128, intermediate_size=512),
    # the embedded default backbone (remedi_patches/embedded/build.py): 1.6M parameters at vocab 512
    dict(name="Diff_LLaMA_embedded", n_layer=6, n_head=4, n_embd=128, intermediate_size=512, block_size=128),
]

name_to_config = {c["name"]: c for c in configs}
