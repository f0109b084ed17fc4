"""LLaDA configuration with the key names of the upstream `config.json` (GSAI-ML/LLaDA-8B-Base).

The defaults are the LLaDA-8B-Base values, so `LLaDAConfig()` is the real 8B model. A `config.json`
written by the upstream remote code (with `auto_map`, `architectures`, `init_fn`, `precision`, ...)
loads as is: keys that this implementation does not read are kept as plain attributes and saved again.
Which values the native model can run is checked when the model is built (`modeling_llada`).
"""

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig


@strict
class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    # standard transformers names (PEFT, accelerate, pipelines) -> upstream names
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
    }

    # sizes
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = 32  # None: n_heads (or 1 with multi_query_attention)
    n_layers: int = 32
    mlp_ratio: int = 4  # used only when mlp_hidden_size is None
    mlp_hidden_size: int | None = 12288
    vocab_size: int = 126464
    embedding_size: int | None = 126464  # rows of wte and of the output head; None: vocab_size
    max_sequence_length: int = 4096
    # architecture switches (upstream names; the native model runs the LLaDA-8B choices)
    block_type: str = "llama"
    block_group_size: int = 1
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    rms_norm_eps: int | float = 1e-5
    rope: bool = True
    rope_theta: int | float = 500000.0
    rope_full_precision: bool = True  # rotate q, k in float32 whatever the model dtype
    alibi: bool = False
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    input_emb_norm: bool = False
    scale_logits: bool = False
    include_bias: bool = False
    include_qkv_bias: bool | None = False
    bias_for_layer_norm: bool | None = False  # None: follows include_bias
    weight_tying: bool = False
    attention_dropout: int | float = 0.0
    residual_dropout: int | float = 0.0
    embedding_dropout: int | float = 0.0
    init_std: int | float = 0.02
    # special tokens
    mask_token_id: int | None = 126336
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    # a bidirectional diffusion LM has no KV cache
    use_cache: bool = False

    @property
    def effective_n_kv_heads(self) -> int:
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.effective_n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def num_embeddings(self) -> int:
        return self.embedding_size if self.embedding_size is not None else self.vocab_size


def llada_8b_config() -> LLaDAConfig:
    """The GSAI-ML/LLaDA-8B-Base configuration (also the class defaults), with its upstream architecture name."""
    return LLaDAConfig(architectures=["LLaDAModelLM"])
