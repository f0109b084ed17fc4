"""Native LLaDA backbone: upstream checkpoint format, reference-exact forward, padding, checkpointing, bf16 RoPE,
real 8B shapes on the meta device, and clear errors for broken checkpoints."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from remedi_patches.llada import LLaDAConfig, LLaDAModelLM, llada_8b_config, load_llada
from remedi_patches.llada import modeling_llada

TINY = dict(
    d_model=64,
    n_heads=4,
    n_kv_heads=4,
    n_layers=2,
    mlp_hidden_size=96,
    vocab_size=100,
    embedding_size=100,
    max_sequence_length=64,
    rope_theta=10000.0,
    mask_token_id=99,
    eos_token_id=98,
    pad_token_id=98,
)
PAD = 98


def tiny_model(seed: int = 0, **overrides) -> LLaDAModelLM:
    """A tiny LLaDA with weights large enough that every part of the forward moves the logits."""
    torch.manual_seed(seed)
    model = LLaDAModelLM(LLaDAConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def expected_names(n_layers: int, head: bool = True) -> list[str]:
    """The GSAI-ML/LLaDA-8B checkpoint's tensor names (DESIGN.md section 4)."""
    names = ["model.transformer.wte.weight"]
    for i in range(n_layers):
        for part in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"):
            names.append(f"model.transformer.blocks.{i}.{part}.weight")
    names.append("model.transformer.ln_f.weight")
    if head:
        names.append("model.transformer.ff_out.weight")
    return names


def reference_rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_rope(positions: torch.Tensor, cfg: LLaDAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos, sin (B, 1, L, head_dim / 2) of the rotation angles positions * theta^(-2i / head_dim)."""
    hd = cfg.d_model // cfg.n_heads
    freq = cfg.rope_theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    angle = positions.double()[:, None, :, None] * freq
    return angle.cos(), angle.sin()


def reference_block(w: dict, x, cos, sin, keep: torch.Tensor, cfg: LLaDAConfig) -> torch.Tensor:
    """One LLaDA block in plain torch; w: its weights by short name, keep (B, 1, 1|L, L) bool (True = attend)."""
    B, L, d = x.shape
    nh, nkv = cfg.n_heads, cfg.n_kv_heads
    hd = d // nh
    half = hd // 2

    def rope(t):  # pairs (i, i + half) rotated by pos * freq_i
        a, b = t[..., :half], t[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    h = reference_rms(x, w["attn_norm.weight"], cfg.rms_norm_eps)
    q = rope((h @ w["q_proj.weight"].T).view(B, L, nh, hd).transpose(1, 2))
    k = rope((h @ w["k_proj.weight"].T).view(B, L, nkv, hd).transpose(1, 2)).repeat_interleave(nh // nkv, 1)
    v = (h @ w["v_proj.weight"].T).view(B, L, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
    scores = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~keep, float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, d)
    x = x + att @ w["attn_out.weight"].T
    h = reference_rms(x, w["ff_norm.weight"], cfg.rms_norm_eps)
    return x + (F.silu(h @ w["ff_proj.weight"].T) * (h @ w["up_proj.weight"].T)) @ w["ff_out.weight"].T


def block_weights(sd: dict, prefix: str) -> dict:
    """The float64 weights under `prefix` (e.g. "model.transformer.blocks.0."), by short name."""
    return {k.removeprefix(prefix): v.double() for k, v in sd.items() if k.startswith(prefix)}


def reference_inputs(ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, cfg):
    """(cos, sin, keep) of the reference: a (B, L) 1/0 key mask (positions then count real tokens) or a
    (B, 1, L, L) bool mask; explicit positions win."""
    B, L = ids.shape
    if mask is None or mask.dim() == 2:
        mask2 = torch.ones(B, L, dtype=torch.long) if mask is None else mask
        keep = mask2[:, None, None, :].bool()
        default = (mask2.cumsum(-1) - 1).clamp(min=0)
    else:
        keep, default = mask.bool(), torch.arange(L).expand(B, L)
    cos, sin = reference_rope(default if positions is None else positions, cfg)
    return cos, sin, keep


def reference_forward(state: dict, cfg: LLaDAConfig, ids: torch.Tensor, mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None):
    """LLaDA's forward in plain float64 torch from the raw state dict (mask: see reference_inputs).

    Returns (logits, [input of each block, ..., output of ln_f])."""
    cos, sin, keep = reference_inputs(ids, mask, positions, cfg)
    x = state["model.transformer.wte.weight"].double()[ids]
    hidden = []
    for i in range(cfg.n_layers):
        hidden.append(x)
        x = reference_block(block_weights(state, f"model.transformer.blocks.{i}."), x, cos, sin, keep, cfg)
    x = reference_rms(x, state["model.transformer.ln_f.weight"].double(), cfg.rms_norm_eps)
    hidden.append(x)
    head = state["model.transformer.wte.weight" if cfg.weight_tying else "model.transformer.ff_out.weight"]
    return x @ head.double().T, hidden


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- format: save, reload through the Auto classes


def test_save_pretrained_writes_upstream_config_and_reloads_strictly(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llada" and saved["architectures"] == ["LLaDAModelLM"]
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
                "rope_theta", "rms_norm_eps", "max_sequence_length", "mask_token_id", "weight_tying", "include_bias"):
        assert saved[key] == TINY.get(key, getattr(model.config, key)), key
    assert saved["block_type"] == "llama" and saved["rope"] is True and saved["activation_type"] == "silu"
    assert not {"hidden_size", "num_attention_heads", "num_hidden_layers"} & saved.keys()  # aliases stay aliases

    ids = torch.randint(0, 100, (2, 9))
    want = model(ids).logits
    for auto in (AutoModel, AutoModelForCausalLM):
        loaded, info = auto.from_pretrained(tmp_path, output_loading_info=True)
        assert type(loaded) is LLaDAModelLM
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert list(loaded.state_dict()) == expected_names(2)
        assert torch.equal(loaded.eval()(ids).logits, want)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LLaDAConfig)


def test_state_dict_names_and_shapes_match_upstream_layout():
    cfg = LLaDAConfig(**{**TINY, "n_kv_heads": 2})
    shapes = {k: tuple(v.shape) for k, v in LLaDAModelLM(cfg).state_dict().items()}
    assert list(shapes) == expected_names(2)
    assert shapes["model.transformer.wte.weight"] == (100, 64)
    assert shapes["model.transformer.blocks.0.q_proj.weight"] == (64, 64)
    assert shapes["model.transformer.blocks.0.k_proj.weight"] == (32, 64)  # 2 kv heads of 16
    assert shapes["model.transformer.blocks.0.ff_proj.weight"] == (96, 64)
    assert shapes["model.transformer.blocks.0.up_proj.weight"] == (96, 64)
    assert shapes["model.transformer.blocks.0.ff_out.weight"] == (64, 96)
    assert shapes["model.transformer.ff_out.weight"] == (100, 64)


def test_upstream_style_config_json_loads_without_remote_code(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    upstream = {  # the key set the upstream remote code writes, at tiny sizes
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "embedding_dropout": 0.0,
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "precision": "amp_bf16", "residual_dropout": 0.0, "rope": True,
        "rope_full_precision": True, "scale_logits": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3", "use_cache": False, "weight_tying": False, **TINY,
    }
    (tmp_path / "config.json").write_text(json.dumps(upstream))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LLaDAConfig) and config.init_fn == "mitchell" and config.dtype == torch.bfloat16
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(model) is LLaDAModelLM and model.config.hidden_size == 64
    model.save_pretrained(tmp_path / "again")  # unknown upstream keys are carried along
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["init_fn"] == "mitchell" and again["auto_map"] == upstream["auto_map"]


def test_weight_tying_has_no_separate_head_and_round_trips(tmp_path):
    model = tiny_model(weight_tying=True)
    assert list(model.state_dict()) == expected_names(2, head=False)
    assert model.get_output_embeddings() is None
    ids = torch.randint(0, 100, (1, 6))
    ref, _ = reference_forward(model.state_dict(), model.config, ids)
    assert max_diff(model(ids).logits, ref) < 1e-5
    model.save_pretrained(tmp_path)
    assert torch.equal(load_llada(tmp_path).eval()(ids).logits, model(ids).logits)


# ---------------------------------------------------------------- forward equals an independent reference


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_and_hidden_states_equal_reference(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 100, (2, 11))
    out = model(ids, output_hidden_states=True)
    ref_logits, ref_hidden = reference_forward(model.state_dict(), model.config, ids)
    assert out.logits.shape == (2, 11, 100)
    assert ref_logits.abs().max() > 1  # the check is not on vanishing numbers
    assert max_diff(out.logits, ref_logits) < 1e-5
    assert len(out.hidden_states) == model.config.n_layers + 1
    for got, want in zip(out.hidden_states, ref_hidden):
        assert max_diff(got, want) < 1e-5


def test_inputs_embeds_and_tuple_output_agree_with_ids():
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 5))
    logits = model(ids).logits
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model(inputs_embeds=embeds).logits, logits)
    as_tuple = model(ids, output_hidden_states=True, return_dict=False)
    assert torch.equal(as_tuple[0], logits) and len(as_tuple[1]) == 3


# ---------------------------------------------------------------- padding


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model(n_kv_heads=2)
    rows = [torch.randint(0, 90, (n,)) for n in (9, 5, 2)]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    ref_logits, _ = reference_forward(model.state_dict(), model.config, ids, mask)
    assert torch.isfinite(out.logits).all()
    for b, r in enumerate(rows):
        alone = model(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long)).logits[0]
        assert max_diff(out.logits[b, L - len(r):], alone) < 1e-5
        assert max_diff(out.logits[b, L - len(r):], ref_logits[b, L - len(r):]) < 1e-5
        alone_last = model(r[None], output_hidden_states=True).hidden_states[-1][0]
        assert max_diff(out.hidden_states[-1][b, L - len(r):], alone_last) < 1e-5
    # a 0 in the mask really hides the key: changing a padded token changes nothing at real positions
    ids2 = ids.clone()
    ids2[2, 0] = 7
    assert max_diff(model(ids2, attention_mask=mask).logits[2, -2:], out.logits[2, -2:]) == 0


def test_four_d_mask_and_explicit_positions_equal_reference():
    model = tiny_model(n_kv_heads=2)
    ids = torch.randint(0, 100, (2, 9))
    keep = torch.rand(2, 1, 9, 9) < 0.6
    keep |= torch.eye(9, dtype=torch.bool)  # every query sees at least itself
    positions = torch.randint(0, 40, (2, 9))
    out = model(ids, attention_mask=keep, position_ids=positions).logits
    ref, _ = reference_forward(model.state_dict(), model.config, ids, keep, positions)
    assert max_diff(out, ref) < 1e-5
    assert max_diff(out, model(ids, position_ids=positions).logits) > 1e-2  # the mask does hide keys


def test_default_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert modeling_llada.default_position_ids(mask, 2, 5, "cpu").tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert modeling_llada.default_position_ids(None, 2, 3, "cpu").tolist() == [[0, 1, 2], [0, 1, 2]]
    start = torch.tensor([3, 5])  # real tokens already in a KV cache
    assert modeling_llada.default_position_ids(mask, 2, 5, "cpu", start).tolist() == [[3, 3, 3, 4, 5], [5, 6, 7, 8, 9]]
    four_d = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    assert modeling_llada.default_position_ids(four_d, 2, 3, "cpu", start).tolist() == [[3, 4, 5], [5, 6, 7]]


def test_all_padding_row_stays_finite():
    model = tiny_model()
    out = model(torch.full((2, 4), PAD), attention_mask=torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]]))
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_gives_identical_loss_and_grads(enable, monkeypatch):
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    targets = torch.randint(0, 100, (2, 8))
    rope_calls = []
    real_apply_rope = modeling_llada.apply_rope
    monkeypatch.setattr(modeling_llada, "apply_rope", lambda *a: rope_calls.append(1) or real_apply_rope(*a))

    def loss_and_grads(checkpointing: bool):
        model = tiny_model(residual_dropout=0.1).train()  # dropout: recomputation must replay the same RNG
        if checkpointing:
            getattr(model, enable)()
        torch.manual_seed(1)
        rope_calls.clear()
        logits = model(ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(rope_calls)

    loss, grads, calls = loss_and_grads(False)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads(True)
    assert calls_ckpt == 2 * calls  # the blocks really were recomputed in backward
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=0, atol=1e-7), name


# ---------------------------------------------------------------- bf16: RoPE in float32


def test_rope_is_computed_and_applied_in_float32_for_bf16_inputs():
    torch.manual_seed(0)
    hd, theta = 128, 500000.0
    x = torch.randn(1, 2, 64, hd).to(torch.bfloat16)
    pos = torch.arange(4000, 4064)[None]  # far positions, where bf16 angles or products are visibly off
    cos, sin = modeling_llada.rope_cos_sin(pos, hd, theta)
    assert cos.dtype == sin.dtype == torch.float32
    angle = pos.double()[:, None, :, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.cat((angle, angle), dim=-1)
    assert max_diff(cos, angle.cos()) < 1e-3 and max_diff(sin, angle.sin()) < 1e-3
    x64 = x.double()
    exact = (x64 * angle.cos() + torch.cat((-x64[..., hd // 2:], x64[..., : hd // 2]), -1) * angle.sin())
    exact = exact.to(torch.bfloat16)
    full = modeling_llada.apply_rope(x, cos, sin, True)
    low = modeling_llada.apply_rope(x, cos, sin, False)  # upstream's rope_full_precision=false
    assert full.dtype == low.dtype == torch.bfloat16
    assert (full != exact).float().mean() < 0.02  # float32 maths, then one rounding to bf16 (measured 0.7%)
    assert (low != exact).float().mean() > 0.2  # what bf16 maths gives (measured 35%)


def test_bf16_model_uses_float32_rope_and_tracks_float32(monkeypatch):
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 12))
    want = model(ids).logits
    seen = []
    real_apply_rope = modeling_llada.apply_rope
    monkeypatch.setattr(
        modeling_llada, "apply_rope",
        lambda x, cos, sin, full: seen.append((x.dtype, cos.dtype, full)) or real_apply_rope(x, cos, sin, full),
    )
    got = model.to(torch.bfloat16)(ids).logits
    assert got.dtype == torch.bfloat16
    assert seen and all(s == (torch.bfloat16, torch.float32, True) for s in seen)
    assert max_diff(got, want) < 0.05 * want.abs().max().item()


# ---------------------------------------------------------------- the real 8B on the meta device


def test_llada_8b_config_on_meta_device_has_8b_parameters():
    cfg = llada_8b_config()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden_size) == (4096, 32, 32, 32, 12288)
    assert cfg.vocab_size == cfg.embedding_size == 126464 and cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (126336, 126081, 126081)
    assert cfg.max_sequence_length == 4096 and not cfg.weight_tying and not cfg.include_bias
    with torch.device("meta"):
        model = LLaDAModelLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == expected_names(32)
    assert shapes["model.transformer.blocks.31.ff_proj.weight"] == (12288, 4096)
    assert shapes["model.transformer.ff_out.weight"] == (126464, 4096)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 8.02e9) / 8.02e9 < 0.005, n


# ---------------------------------------------------------------- bad input


def test_shape_mismatch_names_the_tensor(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "mlp_hidden_size": 128}))
    for load in (AutoModel.from_pretrained, load_llada):
        with pytest.raises(ValueError, match=r"blocks\.0\.ff_proj\.weight.*\(96, 64\).*\(128, 64\).*config\.json"):
            load(tmp_path)
    # asked for explicitly, transformers' meaning holds: the mismatched tensors are re-initialised
    for load in (AutoModel.from_pretrained, load_llada):
        resized = load(tmp_path, ignore_mismatched_sizes=True)
        assert resized.model.transformer.blocks[0].ff_proj.weight.shape == (128, 64)


def test_missing_tensor_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.transformer.blocks.1.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model\.transformer\.blocks\.1\.up_proj\.weight'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_weights_file_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for load in (AutoModel.from_pretrained, load_llada):
        with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt.*Re-download"):
            load(tmp_path)


def test_sharded_checkpoint_loads_and_a_bad_shard_is_named(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 100, (1, 5))
    assert torch.equal(load_llada(tmp_path).eval()(ids).logits, model(ids).logits)
    shards[-1].write_bytes(shards[-1].read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shards[-1].name} is truncated or corrupt"):
        AutoModel.from_pretrained(tmp_path)
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[-1].name} is listed in model.safetensors.index.json"):
        AutoModel.from_pretrained(tmp_path)


def test_non_safetensors_checkpoint_with_wrong_shapes_is_a_clear_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    state["model.transformer.ln_f.weight"] = torch.ones(65)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="do not have the shapes its config.json describes"):
        load_llada(tmp_path)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"block_type": "sequential"}, "block_type='sequential'.*only implements block_type='llama'"),
        ({"rope": False}, "rope=False"),
        ({"n_kv_heads": 3}, "n_heads=4 is not a multiple of n_kv_heads=3"),
        ({"n_heads": 5}, "d_model=64 is not divisible by n_heads=5"),
        ({"embedding_size": 50}, "embedding_size=50 is smaller than vocab_size=100"),
    ],
)
def test_unsupported_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        LLaDAModelLM(LLaDAConfig(**{**TINY, **overrides}))


def test_forward_refuses_labels_attentions_foreign_caches_and_ambiguous_inputs():
    model = tiny_model()
    ids = torch.randint(0, 100, (1, 4))
    with pytest.raises(ValueError, match="computes no loss"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="does not return attention weights"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="must be a remedi_patches.kv_cache.KVCache, got tuple"):
        model(ids, past_key_values=((ids, ids),))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
