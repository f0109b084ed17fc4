"""Dual-stream RemeDi on LLaDA (DESIGN.md 10): the released checkpoint layout, the forward against an independent
reference, a fresh model's TPS = LLaDA, the real 9B on the meta device, the KV cache (LLaDA and RemeDi) against a
block-causal full forward, the registry, and clear errors."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from char_tokenizer import char_tokenizer
from remedi_patches.backbones import backbone_kind, fsdp_block_classes, kind_of, load_backbone
from remedi_patches.kv_cache import KVCache
from remedi_patches.llada import (LLaDABlock, LLaDAConfig, LLaDAModelLM, RemeDiConfig, RemeDiUPMModelLM,
                                  default_ups_positions, llada_8b_config, load_llada)
from test_llada_model import (TINY, block_weights, expected_names, max_diff, reference_block, reference_inputs,
                              reference_rms, tiny_model)

UPS = [0, 1]  # UPS blocks after main layers 0 and 1 of 3: the default rule for 3 layers and 2 blocks
TINY_REMEDI = {**TINY, "n_layers": 3, "ups_positions": UPS}
PARTS = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")


def tiny_remedi(seed: int = 0, **overrides) -> RemeDiUPMModelLM:
    """A tiny dual-stream RemeDi whose every weight (feedback included) is non-zero and moves the outputs."""
    torch.manual_seed(seed)
    model = RemeDiUPMModelLM(RemeDiConfig(**{**TINY_REMEDI, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def official_names(n_layers: int, n_ups: int) -> list[str]:
    """The released RemeDi checkpoints' tensor names (reference A): LLaDA's plus the UPS stream's."""
    names = expected_names(n_layers)
    names += [f"model.blocks_upm.{j}.{part}.weight" for j in range(n_ups) for part in PARTS]
    names += [f"model.backprop_linears.{j}.{w}" for j in range(n_ups) for w in ("weight", "bias")]
    names += [f"model.backprop_norms.{j}.weight" for j in range(n_ups)]
    return names + ["model.ln_f_upm.weight", "model.linear_confidence.weight", "model.linear_confidence.bias"]


def reference_remedi(state: dict, cfg, ids, mask=None, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dual-stream forward in plain float64 torch from the raw state dict -> (logits, confidences)."""
    sd = {k: v.double() for k, v in state.items()}
    cos, sin, keep = reference_inputs(ids, mask, positions, cfg)
    x = sd["model.transformer.wte.weight"][ids]
    u = None
    for b in range(cfg.n_layers):
        x = reference_block(block_weights(sd, f"model.transformer.blocks.{b}."), x, cos, sin, keep, cfg)
        if b in cfg.ups_positions:
            j = cfg.ups_positions.index(b)
            u = reference_block(block_weights(sd, f"model.blocks_upm.{j}."), x if u is None else x + u, cos, sin,
                                keep, cfg)
            fed = reference_rms(u, sd[f"model.backprop_norms.{j}.weight"], cfg.rms_norm_eps)
            x = x + fed @ sd[f"model.backprop_linears.{j}.weight"].T + sd[f"model.backprop_linears.{j}.bias"]
    logits = reference_rms(x, sd["model.transformer.ln_f.weight"], cfg.rms_norm_eps) @ sd[
        "model.transformer.ff_out.weight"].T
    conf = reference_rms(u, sd["model.ln_f_upm.weight"], cfg.rms_norm_eps) @ sd["model.linear_confidence.weight"].T
    return logits, (conf + sd["model.linear_confidence.bias"]).squeeze(-1)


def official_folder(model: RemeDiUPMModelLM, folder, architectures=("LLaDAUPMModelLM",)):
    """Save `model` as the released checkpoints are laid out: LLaDA's config.json (model_type "llada", a UPM
    architecture name, LLaDA's auto_map, no ups_positions) next to the weights, plus a tokenizer."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["ups_positions"]
    config.update(model_type="llada", architectures=list(architectures),
                  auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                            "AutoModel": "modeling_llada.LLaDAModelLM"})
    (folder / "config.json").write_text(json.dumps(config))
    char_tokenizer().save_pretrained(folder)
    return folder


def left_padded(lengths: list[int], vocab: int = 90) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(lengths)
    ids = torch.full((len(lengths), L), TINY["pad_token_id"])
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, L - n:] = torch.randint(0, vocab, (n,))
        mask[b, L - n:] = 1
    return ids, mask


# ---------------------------------------------------------------- the released layout, against the reference


def test_official_layout_reloads_strictly_and_equals_the_reference(tmp_path):
    model = tiny_remedi()
    folder = official_folder(model, tmp_path)
    assert sorted(load_file(folder / "model.safetensors")) == sorted(official_names(3, 2))
    bb = load_backbone(folder)
    loaded = bb.model
    assert type(loaded) is RemeDiUPMModelLM and bb.kind == "llada" and loaded.has_ups_stream
    assert loaded.config.ups_positions == UPS == default_ups_positions(3, 2)  # derived from the 2 UPS blocks
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert type(load_llada(folder)) is RemeDiUPMModelLM

    ids, mask = left_padded([7, 4])
    out = loaded(ids, attention_mask=mask, output_hidden_states=True)
    ref_logits, ref_conf = reference_remedi(model.state_dict(), loaded.config, ids, mask)
    assert out.logits.shape == (2, 7, 100) and out.confidences.shape == (2, 7)
    assert ref_conf.abs().max() > 0.5 and ref_logits.abs().max() > 1  # not vanishing numbers
    real = mask.bool()
    assert max_diff(out.logits[real], ref_logits[real]) < 1e-5
    assert max_diff(out.confidences[real], ref_conf[real]) < 1e-5
    assert len(out.hidden_states) == 4
    # the feedback path is live: without it the TPS logits change
    no_feedback = {k: torch.zeros_like(v) if "backprop_linears" in k else v for k, v in model.state_dict().items()}
    assert max_diff(reference_remedi(no_feedback, loaded.config, ids, mask)[0][real], ref_logits[real]) > 1e-2


def test_save_pretrained_writes_model_type_remedi_and_the_auto_classes_read_it(tmp_path):
    model = tiny_remedi()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "RemeDi" and saved["architectures"] == ["RemeDiUPMModelLM"]
    assert saved["ups_positions"] == UPS
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is RemeDiConfig and config.ups_positions == UPS
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is RemeDiUPMModelLM
    ids = torch.randint(0, 100, (1, 6))
    assert torch.equal(loaded.eval()(ids).confidences, model(ids).confidences)


def test_weights_with_ups_blocks_load_as_dual_stream_whatever_the_architecture_name(tmp_path):
    folder = official_folder(tiny_remedi(ups_positions=[1]), tmp_path, architectures=("LLaDAModelLM",))
    model = load_backbone(folder).model
    assert type(model) is RemeDiUPMModelLM and model.config.ups_positions == [1]  # one block: after layer n - 2


def test_fresh_dual_stream_model_has_the_official_init_and_its_tps_is_llada():
    torch.manual_seed(0)
    remedi = RemeDiUPMModelLM(RemeDiConfig(**TINY_REMEDI)).eval()
    body = remedi.model
    for j in range(2):
        assert not body.backprop_linears[j].weight.any() and not body.backprop_linears[j].bias.any()
        assert torch.equal(body.backprop_norms[j].weight, torch.ones(64))
    assert torch.equal(body.ln_f_upm.weight, torch.ones(64)) and not body.linear_confidence.bias.any()
    assert 0.015 < body.linear_confidence.weight.std() < 0.025
    for j, block in enumerate(body.blocks_upm):  # mitchell, with layer_id = n_layers + j
        assert block.layer_id == 3 + j
        assert abs(block.q_proj.weight.std() / (1 / 64 ** 0.5) - 1) < 0.1
        assert abs(block.attn_out.weight.std() / (1 / 64 ** 0.5 / (2 * (4 + j)) ** 0.5) - 1) < 0.1
        assert abs(block.ff_out.weight.std() / (1 / 96 ** 0.5 / (2 * (4 + j)) ** 0.5) - 1) < 0.1
        assert block.ff_out.weight.abs().max() <= 3 / 96 ** 0.5 / (2 * (4 + j)) ** 0.5  # truncated at 3 sigma

    llada = LLaDAModelLM(LLaDAConfig(**{k: v for k, v in TINY_REMEDI.items() if k != "ups_positions"})).eval()
    llada.load_state_dict({k: v for k, v in remedi.state_dict().items() if k.startswith("model.transformer.")})
    ids, mask = left_padded([6, 3])
    out = remedi(ids, attention_mask=mask)
    assert torch.equal(out.logits, llada(ids, attention_mask=mask).logits)
    assert torch.isfinite(out.confidences).all() and out.confidences.std() > 0


# ---------------------------------------------------------------- the real sizes, on the meta device


def write_config(folder, **changes):
    folder.mkdir()
    config = {**llada_8b_config().to_dict(), **changes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remedi_9b_and_llada_8b_configs_build_on_the_meta_device(tmp_path):
    remedi = load_backbone(write_config(tmp_path / "remedi", architectures=["LLaDAUPMModelLM"]), device="meta")
    llada = load_backbone(write_config(tmp_path / "llada", architectures=["LLaDAModelLM"]), device="meta")
    assert type(remedi.model) is RemeDiUPMModelLM and type(llada.model) is LLaDAModelLM
    assert remedi.model.config.ups_positions == [0, 10, 20, 30]
    assert sum(p.numel() for p in remedi.model.parameters()) == 8_955_179_009
    assert sum(p.numel() for p in llada.model.parameters()) == 8_015_581_184
    for bb in (remedi, llada):
        assert next(bb.model.parameters()).device.type == "meta"
        assert bb.tokenizer is None and (bb.mask_id, bb.eos_id, bb.eot_id) == (126336, 126081, None)
    for name, changes in {"typed": {"model_type": "RemeDi"}, "maple": {"architectures": ["RemeDiUPMModelLM"]}}.items():
        assert type(load_backbone(write_config(tmp_path / name, **changes), device="meta").model) is RemeDiUPMModelLM


# ---------------------------------------------------------------- KV cache == block-causal full forward


def block_causal(prompt_mask: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """(B, 1, L, L) bool for [prompt | block 1 | ... ]: the prompt sees its real tokens, block k the real prompt
    tokens, blocks 1..k-1 and itself."""
    B, Lp = prompt_mask.shape
    L = Lp + block * n_blocks
    seg = torch.cat([torch.zeros(Lp, dtype=torch.long), torch.arange(1, n_blocks + 1).repeat_interleave(block)])
    keep = (seg[None, :] <= seg[:, None]) & ((seg[None, :] == 0) | (seg[:, None] > 0))  # (L, L)
    real = torch.cat([prompt_mask.bool(), torch.ones(B, L - Lp, dtype=torch.bool)], dim=1)  # (B, L)
    return (keep[None] & real[:, None, :])[:, None]


def model_of(kind: str):
    return tiny_model(n_kv_heads=2) if kind == "llada" else tiny_remedi(n_kv_heads=2)


def outputs(out) -> list[torch.Tensor]:
    return [out.logits] + ([out.confidences] if getattr(out, "confidences", None) is not None else [])


@pytest.mark.parametrize("kind", ["llada", "remedi"])
def test_cached_blocks_equal_the_block_causal_full_forward(kind):
    model = model_of(kind)
    prompt, pmask = left_padded([6, 3])
    n_real = pmask.sum(1)
    blocks = [torch.randint(0, 90, (2, 4)) for _ in range(2)]
    pos_p = (pmask.cumsum(1) - 1).clamp(min=0)
    pos = [n_real[:, None] + 4 * k + torch.arange(4) for k in range(2)]

    cache = KVCache()
    out_p = model(prompt, attention_mask=pmask, position_ids=pos_p, past_key_values=cache, use_cache=True)
    assert out_p.cache is cache and len(cache) == 6 and torch.equal(cache.key_mask, pmask.bool())
    out_1 = model(blocks[0], position_ids=pos[0], past_key_values=cache)  # read only
    assert len(cache) == 6
    assert torch.equal(model(blocks[0], past_key_values=cache).logits, out_1.logits)  # default positions continue
    model(blocks[0], position_ids=pos[0], past_key_values=cache, use_cache=True)  # append the finished block
    out_2 = model(blocks[1], position_ids=pos[1], past_key_values=cache)
    assert len(cache) == 10

    full_ids = torch.cat([prompt, *blocks], dim=1)
    keep = block_causal(pmask, 4, 2)
    full = model(full_ids, attention_mask=keep, position_ids=torch.cat([pos_p, *pos], dim=1))
    for got, want in zip(outputs(out_p), outputs(full)):
        assert max_diff(got, want[:, :6]) < 1e-5
    for got, want in zip(outputs(out_1), outputs(full)):
        assert max_diff(got, want[:, 6:10]) < 1e-5
    for got, want in zip(outputs(out_2), outputs(full)):
        assert max_diff(got, want[:, 10:]) < 1e-5
    if kind == "remedi":  # and the full forward is the reference's
        ref_logits, ref_conf = reference_remedi(model.state_dict(), model.config, full_ids, keep,
                                                torch.cat([pos_p, *pos], dim=1))
        assert max_diff(full.logits, ref_logits) < 1e-5 and max_diff(full.confidences, ref_conf) < 1e-5

    # the padded row decodes as the row alone: pads are never attended, positions start at its first real token
    alone = KVCache()
    model(prompt[1:, 3:], past_key_values=alone, use_cache=True)
    for got, want in zip(outputs(model(blocks[0][1:], past_key_values=alone)), outputs(out_1)):
        assert max_diff(got[0], want[1]) < 1e-5


# ---------------------------------------------------------------- registry and training switches


def test_dual_stream_is_the_llada_kind_and_lora_adapts_both_streams_projections():
    model = tiny_remedi()
    kind = kind_of(model)
    assert kind is backbone_kind("llada") and LLaDABlock in fsdp_block_classes(["llada"])
    targets = {name for name, _ in model.named_modules() if re.fullmatch(kind.lora_targets, name)}
    assert "model.transformer.blocks.2.ff_out" in targets and "model.blocks_upm.1.q_proj" in targets
    assert len(targets) == 7 * (3 + 2)  # 7 projections in each of 3 main and 2 UPS blocks
    assert not any(("backprop" in t or "confidence" in t or t == "model.transformer.ff_out") for t in targets)


def test_gradient_checkpointing_recomputes_ups_blocks_with_identical_grads():
    ids = torch.randint(0, 100, (2, 6))

    def grads(checkpointing: bool):
        model = tiny_remedi().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(ids)
        (F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.confidences.square().mean()).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain["model.blocks_upm.0.q_proj.weight"].abs().sum() > 0
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], rtol=0, atol=1e-6), name
    model = tiny_remedi().train()
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="write the KV cache again"):
        model(ids, use_cache=True)


# ---------------------------------------------------------------- clear errors


@pytest.mark.parametrize("positions", [[], [1, 0], [0, 0], [0, 3], [-1, 1]])
def test_wrong_ups_positions_are_refused(positions):
    with pytest.raises(ValueError, match=re.escape(f"ups_positions={positions!r} is not valid for 3 main layers")):
        RemeDiUPMModelLM(RemeDiConfig(**{**TINY_REMEDI, "ups_positions": positions}))


def test_default_rule_places_the_official_blocks_and_refuses_what_does_not_fit():
    assert default_ups_positions(32) == [0, 10, 20, 30]
    assert default_ups_positions(6, 2) == [0, 4] and default_ups_positions(6, 1) == [4]
    with pytest.raises(ValueError, match="cannot place 4 UPS block.*set ups_positions in config.json"):
        RemeDiUPMModelLM(RemeDiConfig(**{**TINY, "n_layers": 3}))
    with pytest.raises(ValueError, match="needs a RemeDiConfig, got LLaDAConfig"):
        RemeDiUPMModelLM(LLaDAConfig(**TINY))


def test_missing_ups_tensors_are_named(tmp_path):
    folder = official_folder(tiny_remedi(), tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["model.blocks_upm.1.up_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model\.blocks_upm\.1\.up_proj\.weight'\]"):
        load_backbone(folder)


def test_non_finite_ups_weights_are_refused_naming_file_and_tensor(tmp_path):
    folder = official_folder(tiny_remedi(), tmp_path)
    state = load_file(folder / "model.safetensors")
    state["model.linear_confidence.weight"][0, 3] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.linear_confidence\.weight' holds NaN"):
        load_backbone(folder)


def test_a_config_placing_ups_blocks_on_plain_llada_weights_says_so(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "RemeDi", "ups_positions": [0]}))
    with pytest.raises(ValueError, match=r"places UPS blocks after main layers \[0\], which these weights do not"):
        load_llada(tmp_path)


def test_llada_class_on_dual_stream_weights_points_to_the_dual_stream_loader(tmp_path):
    folder = official_folder(tiny_remedi(), tmp_path)
    with pytest.raises(ValueError, match=r"hold a dual-stream RemeDi \(model\.blocks_upm\.\*\).*load_backbone"):
        AutoModel.from_pretrained(folder)  # model_type "llada": transformers picks LLaDAModelLM


def test_cache_misuse_is_refused():
    model = tiny_remedi()
    cache = KVCache()
    model(torch.randint(0, 100, (2, 5)), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="filled for batch size 2 but this forward has 1 rows"):
        model(torch.randint(0, 100, (1, 3)), past_key_values=cache)
    with pytest.raises(ValueError, match="use_cache=True needs a \\(batch, length\\) key mask"):
        model(torch.randint(0, 100, (2, 3)), attention_mask=torch.ones(2, 1, 3, 8, dtype=torch.bool),
              past_key_values=cache, use_cache=True)
    assert len(cache) == 5  # a refused forward wrote nothing
    with pytest.raises(ValueError, match=r"4-D attention mask must have shape .*\(2, 1, 3, 8\)"):
        model(torch.randint(0, 100, (2, 3)), attention_mask=torch.ones(2, 1, 3, 3, dtype=torch.bool),
              past_key_values=cache)
