"""remedi_patches.sedd: the native SEDD score network against an independent reference, the upstream checkpoint
layouts (hub folder, run folder with EMA), the parameter counts of sedd-small / -medium, and the "sedd" backbone."""
import json
import math
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

from remedi_patches.backbones import fsdp_block_classes, kind_of, load_backbone, load_eval_model, max_length_of
from remedi_patches.embedded import TOKENIZER_DIR
from remedi_patches.modeling_wrappers import final_norm, hidden_size_of
from remedi_patches.sedd import (SEDD, DDiTBlock, SEDDConfig, load_sedd, save_sedd, sedd_medium, sedd_small,
                                 sedd_state_dict_keys)
from trainer_helpers import load_script

TOKENS = 512  # the embedded tokenizer's vocabulary, so load_backbone can pair the two


def tiny_config(graph="absorb", scale_by_sigma=True, **overrides) -> SEDDConfig:
    return SEDDConfig(**{"hidden_size": 32, "n_heads": 4, "n_blocks": 2, "cond_dim": 16, "length": 24,
                         "dropout": 0.1, "tokens": TOKENS, "graph": graph, "scale_by_sigma": scale_by_sigma,
                         "name": "tiny", **overrides})


def random_sedd(config: SEDDConfig, seed: int = 0) -> SEDD:
    """A tiny SEDD with every parameter random (adaLN-Zero would make the blocks identities)."""
    torch.manual_seed(seed)
    model = SEDD(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def upstream_dict(config: SEDDConfig) -> dict:
    """A full hydra-style dict, as upstream's config.json / .hydra/config.yaml hold it."""
    return {"ngpus": 1, "tokens": config.tokens,
            "training": {"batch_size": 512, "accum": 1, "n_iters": 1300001, "ema": 0.9999},
            "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
            "graph": {"type": config.graph, "file": "data", "report_all": False},
            "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
            "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
            "optim": {"weight_decay": 0, "optimizer": "AdamW", "lr": 3e-4},
            "model": {"name": config.name, "type": "ddit", "hidden_size": config.hidden_size,
                      "cond_dim": config.cond_dim, "length": config.length, "n_blocks": config.n_blocks,
                      "n_heads": config.n_heads, "scale_by_sigma": config.scale_by_sigma,
                      "dropout": config.dropout}}


def inputs(config: SEDDConfig, batch: int = 3, length: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, config.vocab_size, (batch, length), generator=g)
    sigma = torch.tensor([0.05, 0.49, 3.0, 0.7, 12.0][:batch])  # both sides of the expm1 switch at 0.5
    return indices, sigma


# ---------------------------------------------------------------- an independent reference forward (float64)


def _linear(x, sd, name, bias=True):
    out = torch.einsum("...i,oi->...o", x, sd[f"{name}.weight"])
    return out + sd[f"{name}.bias"] if bias else out


def _layer_norm(x, weight):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


def _silu(x):
    return x / (1 + torch.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _rotate(x):
    """x (B, L, heads, D): pair j with j + D/2 at angle pos * 1e4^(-2j/D) (NeoX layout), one pair at a time."""
    B, L, heads, D = x.shape
    out = x.clone()
    for pos in range(L):
        for j in range(D // 2):
            theta = pos * 10000.0 ** (-2 * j / D)
            a, b = x[:, pos, :, j], x[:, pos, :, j + D // 2]
            out[:, pos, :, j] = a * math.cos(theta) - b * math.sin(theta)
            out[:, pos, :, j + D // 2] = b * math.cos(theta) + a * math.sin(theta)
    return out


def reference_forward(model: SEDD, indices: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    config = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, L = indices.shape
    H, heads = config.hidden_size, config.n_heads
    D = H // heads
    V = sd["vocab_embed.embedding"].shape[0]
    x = torch.stack([torch.stack([sd["vocab_embed.embedding"][int(t)] for t in row]) for row in indices])

    half = 128
    freqs = torch.tensor([10000.0 ** (-k / half) for k in range(half)], dtype=torch.float64)
    args = sigma.double()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = _silu(_linear(_silu(_linear(emb, sd, "sigma_map.mlp.0")), sd, "sigma_map.mlp.2"))

    for i in range(config.n_blocks):
        p = f"blocks.{i}"
        mod = _linear(c, sd, f"{p}.adaLN_modulation")[:, None, :]
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[..., k * H:(k + 1) * H] for k in range(6))
        h = _layer_norm(x, sd[f"{p}.norm1.weight"]) * (1 + scale1) + shift1
        qkv = _linear(h, sd, f"{p}.attn_qkv", bias=False).reshape(B, L, 3, heads, D)
        q, k, v = _rotate(qkv[:, :, 0]), _rotate(qkv[:, :, 1]), qkv[:, :, 2]
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        attn = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(B, L, H)
        x = x + gate1 * _linear(attn, sd, f"{p}.attn_out", bias=False)
        h = _layer_norm(x, sd[f"{p}.norm2.weight"]) * (1 + scale2) + shift2
        x = x + gate2 * _linear(_gelu_tanh(_linear(h, sd, f"{p}.mlp.0")), sd, f"{p}.mlp.2")

    mod = _linear(c, sd, "output_layer.adaLN_modulation")[:, None, :]
    shift, scale = mod[..., :H], mod[..., H:]
    out = _linear(_layer_norm(x, sd["output_layer.norm_final.weight"]) * (1 + scale) + shift, sd,
                  "output_layer.linear")
    if config.graph == "absorb" and config.scale_by_sigma:
        for b in range(B):
            out[b] -= math.log(math.exp(float(sigma[b])) - 1) + math.log(V - 1)
    for b in range(B):
        for i in range(L):
            out[b, i, int(indices[b, i])] = 0.0
    return out


@pytest.mark.parametrize("graph,scale_by_sigma", [("absorb", True), ("absorb", False), ("uniform", True)])
def test_forward_matches_an_independent_reference(graph, scale_by_sigma):
    model = random_sedd(tiny_config(graph, scale_by_sigma))
    indices, sigma = inputs(model.config)
    with torch.no_grad():
        got = model(indices, sigma)
    assert got.shape == (3, 10, model.config.vocab_size) and got.dtype == torch.float32
    assert model.config.vocab_size == (TOKENS + 1 if graph == "absorb" else TOKENS)
    want = reference_forward(model, indices, sigma)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got.gather(-1, indices[..., None]) == 0).all()


def test_forward_details():
    model = random_sedd(tiny_config())
    indices, sigma = inputs(model.config)
    with torch.no_grad():
        base = model(indices, sigma)
        assert torch.equal(model(indices, sigma[:1].squeeze()), model(indices, sigma[:1].expand(3)))  # scalar sigma
        model.train()  # dropout 0.1 on the residual branches only
        torch.manual_seed(0)
        assert not torch.allclose(model(indices, sigma), base)
        model.eval()
        model.autocast_dtype = torch.bfloat16  # upstream's bf16 autocast, when asked
        mixed = model(indices, sigma)
    assert mixed.dtype == torch.bfloat16 and (mixed.float() - base).abs().mean() < 0.1
    with pytest.raises(ValueError, match="shape \\(batch, length\\)"):
        model(indices[0], sigma)
    fresh = SEDD(tiny_config())  # adaLN-Zero: a fresh model's output is the sigma scaling alone
    with torch.no_grad():
        out = fresh(indices, sigma)
    assert torch.allclose(out[0, 0, (int(indices[0, 0]) + 1) % TOKENS], -torch.log(torch.expm1(sigma[0])) -
                          math.log(TOKENS))


# ---------------------------------------------------------------- config, counts, state-dict names


def test_upstream_config_round_trip_and_presets():
    config = tiny_config()
    d = upstream_dict(config)
    read = SEDDConfig.from_upstream_dict(d)
    assert read == config and read.to_upstream_dict() == d
    assert read.mask_token_id == TOKENS and read.max_length == 24 and read.head_dim == 8
    assert SEDDConfig.from_upstream_dict(upstream_dict(tiny_config("uniform"))).mask_token_id is None
    small, medium = sedd_small(), sedd_medium()
    assert (small.hidden_size, small.n_heads, small.n_blocks, small.cond_dim, small.length) == (768, 12, 12, 128, 1024)
    assert (medium.hidden_size, medium.n_heads, medium.n_blocks, medium.cond_dim) == (1024, 16, 24, 128)
    assert small.tokens == 50257 and small.vocab_size == 50258 and small.mask_token_id == 50257
    assert small.graph == "absorb" and small.noise == "loglinear" and small.scale_by_sigma and small.dropout == 0.1
    with pytest.raises(ValueError, match="lacks the key\\(s\\) \\['noise'\\]"):
        SEDDConfig.from_upstream_dict({k: v for k, v in d.items() if k != "noise"})
    with pytest.raises(ValueError, match="graph.type 'cosine'"):
        SEDDConfig.from_upstream_dict({**d, "graph": {"type": "cosine"}})


@pytest.mark.parametrize("preset,total,blocks", [(sedd_small, 169_627_218, 12), (sedd_medium, 424_477_010, 24)])
def test_parameter_counts_and_state_dict_names(preset, total, blocks):
    config = preset()
    with torch.device("meta"):
        model = SEDD(config)
    assert sum(p.numel() for p in model.parameters()) == total
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == sedd_state_dict_keys(config)
    assert len(shapes) == 1 + 4 + 1 + 10 * blocks + 5
    H, V = config.hidden_size, 50258
    expected = {
        "vocab_embed.embedding": (V, H),
        "sigma_map.mlp.0.weight": (128, 256), "sigma_map.mlp.0.bias": (128,),
        "sigma_map.mlp.2.weight": (128, 128), "sigma_map.mlp.2.bias": (128,),
        "rotary_emb.inv_freq": (32,),
        "output_layer.norm_final.weight": (H,), "output_layer.linear.weight": (V, H), "output_layer.linear.bias": (V,),
        "output_layer.adaLN_modulation.weight": (2 * H, 128), "output_layer.adaLN_modulation.bias": (2 * H,),
    }
    for i in (0, blocks - 1):
        expected.update({
            f"blocks.{i}.norm1.weight": (H,), f"blocks.{i}.attn_qkv.weight": (3 * H, H),
            f"blocks.{i}.attn_out.weight": (H, H), f"blocks.{i}.norm2.weight": (H,),
            f"blocks.{i}.mlp.0.weight": (4 * H, H), f"blocks.{i}.mlp.0.bias": (4 * H,),
            f"blocks.{i}.mlp.2.weight": (H, 4 * H), f"blocks.{i}.mlp.2.bias": (H,),
            f"blocks.{i}.adaLN_modulation.weight": (6 * H, 128), f"blocks.{i}.adaLN_modulation.bias": (6 * H,),
        })
    assert {k: shapes[k] for k in expected} == expected
    assert [k for k in shapes if "bias" in k and ("attn_qkv" in k or "attn_out" in k or "norm" in k)] == []


# ---------------------------------------------------------------- checkpoint layouts


def _same_outputs(a: SEDD, b: SEDD) -> None:
    indices, sigma = inputs(a.config)
    with torch.no_grad():
        assert torch.equal(a(indices, sigma), b(indices, sigma))


def test_hub_layout_round_trip_safetensors_and_bin(tmp_path):
    model = random_sedd(tiny_config())
    folder = save_sedd(model, tmp_path / "hub")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == model.config.to_upstream_dict()
    loaded = load_sedd(folder)
    assert not loaded.training and loaded.config == model.config
    _same_outputs(model, loaded)

    bin_folder = tmp_path / "bin"  # the older hub layout: the full hydra dict + pytorch_model.bin
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text(json.dumps(upstream_dict(model.config)))
    torch.save(model.state_dict(), bin_folder / "pytorch_model.bin")
    _same_outputs(model, load_sedd(bin_folder))
    half = load_sedd(bin_folder, dtype=torch.bfloat16)
    assert half.vocab_embed.embedding.dtype == torch.bfloat16
    cos, sin = model.rotary_emb(1024, torch.device("cpu"))  # the bf16-rounded buffer is not used for the angles
    assert [torch.equal(a, b) for a, b in zip((cos, sin), half.rotary_emb(1024, torch.device("cpu")))] == [True] * 2
    again = load_sedd(save_sedd(half, tmp_path / "from_bf16"))  # saved as float32, inv_freq exact
    assert again.vocab_embed.embedding.dtype == torch.float32
    assert torch.equal(again.rotary_emb.inv_freq, model.rotary_emb.inv_freq)


def _run_folder(tmp_path, model: SEDD, ema: SEDD, numbered: bool = False):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(upstream_dict(model.config)))
    ckpt = {"optimizer": {"state": {}, "param_groups": []},
            "model": {f"module.{k}": v for k, v in model.state_dict().items()},  # saved from the DDP wrapper
            "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": [p.detach().clone() for p in ema.parameters()]},
            "step": 7}
    if numbered:
        (run / "checkpoints").mkdir()
        torch.save(ckpt, run / "checkpoints" / "checkpoint_12.pth")
        torch.save({**ckpt, "ema": {"shadow_params": []}}, run / "checkpoints" / "checkpoint_3.pth")
    else:
        (run / "checkpoints-meta").mkdir()
        torch.save(ckpt, run / "checkpoints-meta" / "checkpoint.pth")
    return run


@pytest.mark.parametrize("numbered", [False, True])
def test_run_folder_loads_the_ema_weights(tmp_path, numbered):
    raw, ema = random_sedd(tiny_config(), seed=0), random_sedd(tiny_config(), seed=5)
    run = _run_folder(tmp_path, raw, ema, numbered)
    loaded = load_sedd(run)
    _same_outputs(loaded, ema)
    assert not torch.equal(loaded.vocab_embed.embedding, raw.vocab_embed.embedding)
    _same_outputs(load_sedd(run, ema=False), raw)
    if not numbered:
        _same_outputs(load_sedd(run / "checkpoints-meta" / "checkpoint.pth"), ema)


# ---------------------------------------------------------------- the "sedd" backbone


def _with_tokenizer(folder):
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy2(f, folder / f.name)
    return folder


def test_load_backbone_recognises_sedd_folders(tmp_path):
    model = random_sedd(tiny_config())
    folder = _with_tokenizer(save_sedd(model, tmp_path / "hub"))
    bb = load_backbone(folder)
    assert bb.kind == "sedd" and bb.mask_id == TOKENS == len(bb.tokenizer)
    assert bb.eos_id == bb.tokenizer.eos_token_id
    _same_outputs(model, bb.model)
    assert kind_of(bb.model).name == "sedd" and hidden_size_of(bb.model) == 32 and max_length_of(bb.model) == 24
    assert final_norm(bb.model) is bb.model.output_layer.norm_final
    assert DDiTBlock in fsdp_block_classes(["sedd"])
    targets = [n for n, _ in bb.model.named_modules() if re.fullmatch(kind_of(bb.model).lora_targets, n)]
    assert targets == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn_qkv", "attn_out")]

    meta = load_backbone(folder, device="meta")
    assert meta.kind == "sedd" and meta.model.vocab_embed.embedding.is_meta and meta.mask_id == TOKENS

    run = _run_folder(tmp_path, model, model)
    assert load_backbone(run, tokenizer=TOKENIZER_DIR).kind == "sedd"
    assert load_backbone(run / "checkpoints-meta" / "checkpoint.pth", tokenizer=TOKENIZER_DIR).kind == "sedd"


def test_bad_sedd_folders_name_the_problem(tmp_path):
    model = random_sedd(tiny_config())
    folder = save_sedd(model, tmp_path / "hub")

    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder} holds config.json but no weights"):
        load_sedd(folder)

    wrong = random_sedd(tiny_config(hidden_size=16, n_heads=2))
    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors does not fit .*wrong shape .*vocab_embed.embedding"):
        load_sedd(folder)

    state = dict(model.state_dict())
    del state["blocks.1.attn_out.weight"]
    state["blocks.1.extra"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="missing \\['blocks.1.attn_out.weight'\\]; unexpected \\['blocks.1.extra'\\]"):
        load_sedd(folder)

    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt"):
        load_sedd(folder)

    nan = random_sedd(tiny_config())
    with torch.no_grad():
        nan.blocks[0].mlp[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="refusing to save the SEDD .*blocks.0.mlp.0.weight"):
        save_sedd(nan, tmp_path / "nan")
    state = {k: v.contiguous() for k, v in nan.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="'blocks.0.mlp.0.weight' holds NaN or inf"):
        load_sedd(folder)

    broken = tmp_path / "broken"
    broken.mkdir()
    d = upstream_dict(model.config)
    del d["model"]["length"]
    (broken / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="config.json: upstream SEDD config lacks \\['model.length'\\]"):
        load_sedd(broken)
    with pytest.raises(FileNotFoundError, match="neither config.json .* nor .hydra/config.yaml"):
        load_sedd(tmp_path)

    uniform = _with_tokenizer(save_sedd(random_sedd(tiny_config("uniform")), tmp_path / "uniform"))
    assert load_backbone(uniform).mask_id is None  # the SEDD tools take it; masked-diffusion samplers cannot
    with pytest.raises(ValueError, match="uniform graph, which has no \\[MASK\\].*SMDM/sedd/sample.py"):
        load_eval_model(str(uniform), device="cpu")
    sample = load_script("SMDM/sedd/sample.py")
    texts = sample.main(["--model", str(uniform), "--device", "cpu", "--prompt", "Hi there", "--gen_length", "4",
                         "--steps", "2"])
    assert len(texts) == 1
    with pytest.raises(ValueError, match="uniform graph, so leave the temperature at 1"):
        sample.main(["--model", str(uniform), "--device", "cpu", "--prompt", "Hi", "--gen_length", "4",
                     "--steps", "2", "--temperature", "0"])
    big = _with_tokenizer(save_sedd(random_sedd(tiny_config(tokens=100)), tmp_path / "small_vocab"))
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but the SEDD .* embeds 100"):
        load_backbone(big)

    raw = random_sedd(tiny_config())
    run = _run_folder(tmp_path, raw, raw)
    ckpt = torch.load(run / "checkpoints-meta" / "checkpoint.pth", weights_only=True)
    ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][:-1]
    torch.save(ckpt, run / "checkpoints-meta" / "checkpoint.pth")
    with pytest.raises(ValueError, match="the EMA holds 29 tensors, the SEDD its config describes has 30"):
        load_sedd(run)
    del ckpt["ema"]
    torch.save(ckpt, run / "checkpoints-meta" / "checkpoint.pth")
    with pytest.raises(ValueError, match="holds no EMA weights"):
        load_sedd(run)
    (run / "checkpoints-meta" / "checkpoint.pth").unlink()
    with pytest.raises(FileNotFoundError, match="is not a backbone this project can load"):
        load_backbone(run)  # .hydra alone is not a run folder for the registry
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_sedd(run)


def test_a_llada_config_json_is_not_taken_for_sedd(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llada", "d_model": 32, "model": "x"}))
    from remedi_patches.backbones import detect_kind

    assert detect_kind(tmp_path).name == "llada"


def test_run_folder_config_without_omegaconf(tmp_path, monkeypatch):
    import sys

    model = random_sedd(tiny_config())
    run = _run_folder(tmp_path, model, model)
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # not installed: PyYAML reads .hydra/config.yaml
    _same_outputs(load_sedd(run), model)


def test_hub_names_download_the_hub_layout(tmp_path, monkeypatch):
    import huggingface_hub

    from remedi_patches.sedd import loading

    model = random_sedd(tiny_config())
    folder = save_sedd(model, tmp_path / "snapshot")
    calls = []

    def snapshot(repo_id, local_files_only):
        calls.append((repo_id, local_files_only))
        if repo_id != "louaaron/sedd-small":
            raise OSError("Repository Not Found")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    bb = load_backbone("louaaron/sedd-small", tokenizer=TOKENIZER_DIR)
    assert bb.kind == "sedd" and calls == [("louaaron/sedd-small", True)]
    _same_outputs(model, bb.model)
    with pytest.raises(FileNotFoundError, match="could not get model 'louaaron/sedd-tiny' .*Repository Not Found"):
        load_sedd("louaaron/sedd-tiny")
