"""Dual-stream SMDM RemeDi (lit_gpt.dual_stream) and the embedded RemeDi builder (remedi_patches.embedded.remedi).

The block-decoding cache of both SMDM models is tested in test_smdm_model.py (test_cached_blocks_...)."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from lit_gpt.config import Config
from lit_gpt.dual_stream import RemeDiTransEncoder, default_ups_positions, remedi_from_backbone
from lit_gpt.model import TransEncoder, build_model, load_smdm_folder, load_weights, save_smdm_folder
from remedi_patches.backbones import EMBEDDED_DIR, kind_of, load_backbone
from remedi_patches.cli import UserError, run_main
from remedi_patches.embedded.remedi import REMEDI_RECIPE, build_embedded_remedi, main, train_embedded_remedi

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> Config:
    return Config.from_name("Diff_LLaMA_tiny_gqa", **{"vocab_size": 100, "block_size": 32, "n_layer": 4,
                                                      "ups_positions": [0, 2, 3], **overrides})


def live(model: RemeDiTransEncoder, seed: int = 0) -> RemeDiTransEncoder:
    """Non-zero feedback (so the UPS changes the TPS) and non-trivial norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".feedback." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif p.dim() == 1 and "confidence" not in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


# ---------------------------------------------------------------- independent reference forward (float64)


def ref_block(sd, prefix, x, positions, keep, cfg):
    """One pre-norm block; heads by einsum, RoPE as complex rotation of the (i, i + hs/2) pairs."""
    hs, nh, ng = cfg.head_size, cfg.n_head, cfg.n_query_groups
    r, T = nh // ng, x.shape[0]

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(t):  # (T, heads, hs)
        half = hs // 2
        theta = positions.double()[:, None] * cfg.rope_base ** (-2.0 * torch.arange(half, dtype=torch.float64) / hs)
        z = torch.complex(t[..., :half], t[..., half:]) * torch.polar(torch.ones_like(theta), theta)[:, None, :]
        return torch.cat([z.real, z.imag], -1)

    h = rms(x, sd[prefix + "norm_1.weight"])
    qkv = (h @ sd[prefix + "attn.attn.weight"].T).view(T, ng, r + 2, hs)
    q = rope(qkv[:, :, :r].reshape(T, nh, hs))
    group = torch.arange(nh) // r  # query head -> its key/value group
    k, v = rope(qkv[:, group, r]), qkv[:, group, r + 1]
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hs)
    att = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
    x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(T, -1) @ sd[prefix + "attn.proj.weight"].T
    h = rms(x, sd[prefix + "norm_2.weight"])
    gate = F.silu(h @ sd[prefix + "mlp.swiglu.w1.weight"].T) * (h @ sd[prefix + "mlp.swiglu.w2.weight"].T)
    return x + gate @ sd[prefix + "mlp.swiglu.w3.weight"].T


def reference_dual(model, idx, positions, keep):
    """The paper's wiring, written out: logits (T, V) and confidences (T,) of one row."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x, u = sd["transformer.wte.weight"][idx], None
    for i in range(cfg.n_layer):
        x = ref_block(sd, f"transformer.h.{i}.", x, positions, keep, cfg)
        if i in cfg.ups_positions:
            j = cfg.ups_positions.index(i)
            u = ref_block(sd, f"ups.h.{j}.", x if u is None else x + u, positions, keep, cfg)
            x = x + rms(u, sd[f"ups.feedback_norm.{j}.weight"]) @ sd[f"ups.feedback.{j}.weight"].T \
                + sd[f"ups.feedback.{j}.bias"]
    logits = rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T
    confidences = rms(u, sd["ups.ln_f.weight"]) @ sd["ups.confidence.weight"][0] + sd["ups.confidence.bias"][0]
    return logits, confidences


def test_dual_stream_forward_equals_reference_with_live_feedback():
    torch.manual_seed(0)
    model = live(RemeDiTransEncoder(tiny_config()))
    idx = torch.randint(0, 101, (2, 9))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    out = model(idx, attention_mask=mask)
    assert out.logits.shape == (2, 9, 128) and out.confidences.shape == (2, 9)
    for b in range(2):
        real = mask[b].bool()
        positions = (mask[b].cumsum(0) - 1).clamp(min=0)
        logits, confidences = reference_dual(model, idx[b], positions, real[None, :].expand(9, 9))
        assert (out.logits[b].double() - logits)[real].abs().max() < 1e-5
        assert (out.confidences[b].double() - confidences)[real].abs().max() < 1e-5
    # the feedback is live: without it the TPS logits change
    with torch.no_grad():
        for p in model.ups.feedback.parameters():
            p.zero_()
    assert (model(idx, attention_mask=mask).logits - out.logits).abs().max() > 1e-3


def test_fresh_model_tps_is_its_main_stream():
    """Zero feedback at init: the TPS of a fresh dual-stream model is the TransEncoder of its main-stream weights."""
    torch.manual_seed(1)
    model = RemeDiTransEncoder(tiny_config()).eval()
    assert all(not p.detach().any() for p in model.ups.feedback.parameters())
    assert 0.01 < float(model.ups.confidence.weight.detach().std()) < 0.03 and not model.ups.confidence.bias.any()
    single = TransEncoder(tiny_config(ups_positions=None)).eval()
    single.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ups.")})
    idx = torch.randint(0, 101, (2, 7))
    assert torch.equal(model(idx).logits, single(idx))


def test_state_dict_names_and_shapes():
    model = RemeDiTransEncoder(tiny_config())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("ups.")}
    d, hidden, qkv = 64, 256, (4 + 2 * 2) * 16
    expected = {"ups.ln_f.weight": (d,), "ups.confidence.weight": (1, d), "ups.confidence.bias": (1,)}
    for j in range(3):
        expected.update({f"ups.feedback.{j}.weight": (d, d), f"ups.feedback.{j}.bias": (d,),
                         f"ups.feedback_norm.{j}.weight": (d,), f"ups.h.{j}.norm_1.weight": (d,),
                         f"ups.h.{j}.norm_2.weight": (d,), f"ups.h.{j}.attn.attn.weight": (qkv, d),
                         f"ups.h.{j}.attn.proj.weight": (d, d), f"ups.h.{j}.mlp.swiglu.w1.weight": (hidden, d),
                         f"ups.h.{j}.mlp.swiglu.w2.weight": (hidden, d),
                         f"ups.h.{j}.mlp.swiglu.w3.weight": (d, hidden)})
    assert shapes == expected
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ups."))
    assert main == sum(p.numel() for p in TransEncoder(tiny_config(ups_positions=None)).parameters())
    # SMDM's kind recognises the subclass; LoRA's auto targets match the UPS blocks' linears too, not the
    # feedback or confidence linears
    kind = kind_of(model)
    assert kind.name == "smdm"
    targets = sorted(n for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and re.fullmatch(kind.lora_targets, n) and n.startswith("ups."))
    assert targets == sorted(f"ups.h.{j}.{m}" for j in range(3) for m in ("attn.attn", "attn.proj", "mlp.swiglu.w1",
                                                                           "mlp.swiglu.w2", "mlp.swiglu.w3"))


def test_save_load_round_trip_is_strict(tmp_path):
    torch.manual_seed(2)
    model = live(RemeDiTransEncoder(tiny_config()), seed=3)
    folder = save_smdm_folder(model, tmp_path / "remedi")
    assert json.loads((folder / "smdm_config.json").read_text())["ups_positions"] == [0, 2, 3]
    loaded = load_smdm_folder(folder)
    assert type(loaded) is RemeDiTransEncoder and loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    idx = torch.randint(0, 101, (2, 6))
    a, b = model(idx), loaded(idx)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.confidences, b.confidences)
    assert isinstance(build_model(model.config), RemeDiTransEncoder)
    assert type(build_model(tiny_config(ups_positions=None))) is TransEncoder


def test_single_stream_folders_still_load(tmp_path):
    """smdm_config.json written before ups_positions existed (the shipped backbone) -> a TransEncoder."""
    assert "ups_positions" not in json.loads((EMBEDDED_DIR / "smdm_config.json").read_text())
    model = load_smdm_folder(EMBEDDED_DIR)
    assert type(model) is TransEncoder and model.config.ups_positions is None and not model.has_ups_stream
    assert type(load_backbone(None).model) is TransEncoder


def test_nonfinite_ups_weights_refused(tmp_path):
    model = RemeDiTransEncoder(tiny_config())
    with torch.no_grad():
        model.ups.confidence.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save.*'ups.confidence.weight'.*NaN or inf"):
        save_smdm_folder(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_clear_errors(tmp_path):
    for bad in ([], [4], [2, 1], [1, 1], 3, [0.5]):
        with pytest.raises(ValueError, match=r"ups_positions=.* must be a non-empty, strictly increasing list of "
                                             r"main-layer indices in \[0, n_layer=4\)"):
            tiny_config(ups_positions=bad)
    assert tiny_config(ups_positions=(0, 3)).ups_positions == [0, 3]  # a tuple is taken as its list
    with pytest.raises(ValueError, match=r"has ups_positions=\[0, 2, 3\].*build it with lit_gpt.model.build_model"):
        TransEncoder(tiny_config())
    with pytest.raises(ValueError, match="has no ups_positions: a dual-stream RemeDi needs"):
        RemeDiTransEncoder(tiny_config(ups_positions=None))
    single = TransEncoder(tiny_config(ups_positions=None))
    dual = RemeDiTransEncoder(tiny_config())
    save_smdm_folder(single, tmp_path / "single")
    save_smdm_folder(dual, tmp_path / "dual")
    with pytest.raises(ValueError, match=r"missing \['ups.confidence.bias'.*single-stream TransEncoder and the model "
                                         r"is a dual-stream RemeDi.*remedi_from_backbone"):
        load_weights(RemeDiTransEncoder(tiny_config()), tmp_path / "single")
    with pytest.raises(ValueError, match=r"holds a dual-stream RemeDi \(ups.\* tensors\).*ups_positions"):
        load_weights(TransEncoder(tiny_config(ups_positions=None)), tmp_path / "dual")
    with pytest.raises(ValueError, match="takes a single-stream TransEncoder; RemeDiTransEncoder already has a UPS"):
        remedi_from_backbone(dual)
    with pytest.raises(ValueError, match="ups_init='zeros': use one of copy, smdm"):
        remedi_from_backbone(single, ups_init="zeros")
    with pytest.raises(ValueError, match=r"ups_positions=\[7\] must be"):
        remedi_from_backbone(single, [7])


def test_default_ups_positions():
    assert default_ups_positions(32) == [0, 10, 20, 30]  # the official RemeDi-9B's
    assert default_ups_positions(6) == [0, 2, 4]
    assert [default_ups_positions(n) for n in (1, 2, 3, 4)] == [[0], [0], [0, 1], [0, 1, 2]]
    for n in range(1, 40):
        Config.from_name("Diff_LLaMA_tiny", n_layer=n, ups_positions=default_ups_positions(n))  # always valid


@pytest.mark.parametrize("ups_init", ["copy", "smdm"])
def test_remedi_from_backbone(ups_init):
    torch.manual_seed(4)
    backbone = TransEncoder(tiny_config(ups_positions=None)).eval()
    model = remedi_from_backbone(backbone, [0, 1, 3], ups_init=ups_init).eval()
    idx = torch.randint(0, 101, (2, 8))
    assert torch.equal(model(idx).logits, backbone(idx))
    for j, b in enumerate([0, 1, 3]):
        copied = backbone.transformer.h[min(b + 1, 3)].state_dict()
        same = all(torch.equal(v, model.ups.h[j].state_dict()[k]) for k, v in copied.items())
        assert same == (ups_init == "copy")


# ---------------------------------------------------------------- the embedded RemeDi


@pytest.fixture(scope="module")
def embedded_remedi(tmp_path_factory):
    return build_embedded_remedi(tmp_path_factory.mktemp("er") / "embedded_remedi")


def test_embedded_remedi_tps_equals_the_backbone(embedded_remedi):
    remedi, backbone = load_backbone(embedded_remedi), load_backbone(None)
    assert type(remedi.model) is RemeDiTransEncoder and remedi.kind == "smdm" and remedi.model.has_ups_stream
    assert remedi.model.config.ups_positions == [0, 2, 4]
    assert (remedi.mask_id, remedi.eos_id) == (backbone.mask_id, backbone.eos_id)
    ids = remedi.tokenizer(["Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:"],
                           return_tensors="pt").input_ids
    ids = torch.cat([ids, torch.full((1, 16), remedi.mask_id)], 1)
    with torch.no_grad():
        out = remedi.model(ids)
        assert torch.equal(out.logits, backbone.model(ids))
    assert out.confidences.shape == ids.shape and bool(torch.isfinite(out.confidences).all())
    assert len(set(out.confidences[0].tolist())) > 1  # the UPS says something per position
    files = sorted(p.name for p in embedded_remedi.iterdir())
    assert files == ["BUILD.json", "model.safetensors", "sentencepiece.model", "smdm_config.json", "task.json",
                     "tokenizer.json", "tokenizer_config.json"]
    record = json.loads((embedded_remedi / "BUILD.json").read_text())
    ups = sum(p.numel() for p in remedi.model.ups.parameters())
    assert record["parameters"] == {"tps": sum(p.numel() for p in backbone.model.parameters()), "ups": ups}
    d, blocks = 128, 3
    assert ups == blocks * (4 * d * d + 3 * d * 512 + 2 * d) + blocks * (d * d + 2 * d) + d + d + 1


def test_embedded_remedi_build_is_deterministic_and_copies_blocks(embedded_remedi, tmp_path):
    model, first = load_smdm_folder(build_embedded_remedi(tmp_path / "again")), load_smdm_folder(embedded_remedi)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in model.state_dict().items())
    backbone = load_smdm_folder(EMBEDDED_DIR)
    for j, b in enumerate([0, 2, 4]):
        assert all(torch.equal(v, model.ups.h[j].state_dict()[k])
                   for k, v in backbone.transformer.h[b + 1].state_dict().items())


def test_embedded_remedi_cli(tmp_path, capsys):
    shipped = sorted((p.name, p.stat().st_mtime) for p in (EMBEDDED_DIR.parent / "remedi").glob("*"))
    out = run_main(main, ["--untrained", "--out_dir", str(tmp_path / "cli"), "--ups_positions", "1", "3",
                          "--ups_init", "smdm", "--seed", "5"])
    assert out == tmp_path / "cli" and f"written to {out}" in capsys.readouterr().out
    record = json.loads((out / "BUILD.json").read_text())
    assert record["command"] == ("python -m remedi_patches.embedded.remedi --untrained --out_dir "
                                 f"{out} --ups_positions 1 3 --ups_init smdm --seed 5")
    assert (record["ups_positions"], record["ups_init"], record["seed"]) == ([1, 3], "smdm", 5)
    for argv, message in [(["--ups_positions", "6"], "ups_positions=[6] must be a non-empty, strictly increasing"),
                          (["--out_dir", str(EMBEDDED_DIR.parent / "remedi")], "is inside the source tree"),
                          (["--backbone", str(out), "--out_dir", str(tmp_path / "twice")],
                           "already holds a dual-stream RemeDi")]:
        with pytest.raises(SystemExit) as exit_:
            run_main(main, ["--untrained", "--out_dir", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1
    assert sorted((p.name, p.stat().st_mtime) for p in (EMBEDDED_DIR.parent / "remedi").glob("*")) == shipped


def test_embedded_remedi_build_resumes_only_its_own_recipe(tmp_path):
    """A killed build resumes in its --work_dir; a build with another recipe there is refused before training (a
    resumed checkpoint of other settings would leave the documented trajectory)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipe.json").write_text(json.dumps({**REMEDI_RECIPE, "max_steps": 3}) + "\n")
    with pytest.raises(UserError, match="holds a build with another recipe"):
        train_embedded_remedi(tmp_path / "out", work, REMEDI_RECIPE)
    assert not (work / "train").exists() and not (tmp_path / "out").exists()


def test_export_smdm_writes_a_dual_stream_checkpoint_as_a_remedi_folder(tmp_path):
    """The trainers' export (lit_gpt.training.export_smdm) builds the class the config names, so a dual-stream
    checkpoint exports to a folder that loads back as RemeDiTransEncoder with the same weights."""
    from lightning_fabric import Fabric

    from lit_gpt.training import export_smdm

    config = Config.from_name("Diff_LLaMA_tiny", vocab_size=64, n_layer=2, block_size=32, ups_positions=[0])
    model = build_model(config)
    torch.save({"model": model.state_dict()}, tmp_path / "iter-000003-ckpt.pth")
    export_smdm(Fabric(accelerator="cpu", devices=1), tmp_path, config, tmp_path / "final")
    loaded = load_smdm_folder(tmp_path / "final")
    assert isinstance(loaded, RemeDiTransEncoder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
