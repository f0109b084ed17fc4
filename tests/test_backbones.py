"""remedi_patches.backbones.load_backbone: one loader for every source, with the special ids the sampler needs."""
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lit_gpt.model import TransEncoder, save_smdm_folder
from remedi_patches import backbones
from remedi_patches.sources import is_hub_name
from remedi_patches.backbones import (EMBEDDED_DIR, LLADA_MASK_ID, BackboneKind, backbone_kind, fsdp_block_classes,
                                      kind_of, load_backbone, max_length_of, register_backbone, unregister_backbone)
from remedi_patches.modeling_wrappers import UPSModel, final_norm, hidden_size_of
from remedi_patches.ups_head import UPSHead
from remedi_patches.embedded import TOKENIZER_DIR
from remedi_patches.llada import LLaDAConfig, LLaDAModelLM


def _with_tokenizer(folder):
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy2(f, folder / f.name)
    return folder


def test_embedded_default_is_the_shipped_smdm_model():
    bb = load_backbone(None)
    assert bb.kind == "smdm" and bb.mask_id == len(bb.tokenizer) == 512
    assert bb.eos_id == bb.tokenizer.eos_token_id and bb.eot_id is None
    assert not bb.model.training
    assert load_backbone("embedded").name == str(EMBEDDED_DIR)


def test_llada_folder(tmp_path):
    torch.manual_seed(0)
    config = LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=64, vocab_size=600,
                         embedding_size=600, max_sequence_length=64)
    LLaDAModelLM(config).save_pretrained(tmp_path)
    bb = load_backbone(_with_tokenizer(tmp_path), dtype="bfloat16")
    assert bb.kind == "llada" and isinstance(bb.model, LLaDAModelLM)
    assert bb.mask_id == LLADA_MASK_ID and next(bb.model.parameters()).dtype == torch.bfloat16


def test_smdm_export_and_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TransEncoder.from_name("Diff_LLaMA_tiny", vocab_size=512, block_size=64)
    folder = _with_tokenizer(save_smdm_folder(model, tmp_path / "export"))
    x = torch.randint(0, 512, (1, 8))
    bb = load_backbone(folder)
    assert bb.kind == "smdm" and bb.mask_id == 512
    torch.testing.assert_close(bb.model(x), model.eval()(x))

    ckpt = tmp_path / "iter-000010-ckpt.pth"
    torch.save({"model": model.state_dict(), "iter_num": 10, "hparams": {"vocab_size": 512}}, ckpt)  # as train_mdm
    bb = load_backbone(ckpt, smdm_size="Diff_LLaMA_tiny", tokenizer=TOKENIZER_DIR)
    assert bb.mask_id == 512
    torch.testing.assert_close(bb.model(x), model(x))
    with pytest.raises(ValueError, match="--smdm_size"):
        load_backbone(ckpt, tokenizer=TOKENIZER_DIR)
    with pytest.raises(ValueError, match="--tokenizer"):
        load_backbone(ckpt, smdm_size="Diff_LLaMA_tiny")


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="'no_such_model' does not exist.*not a hub name"):
        load_backbone("no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a backbone this project can load"):
        load_backbone(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_backbone(None, dtype="float8")


# ---------------------------------------------------------------- the registry: one entry per backbone kind


class ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mix = nn.Linear(d, d)

    def forward(self, x):
        return x + self.mix(x)


class ToyNet(nn.Module):
    """A backbone of a kind the project does not know: bare logits, final norm `final`, width in config.width."""

    def __init__(self, vocab=600, width=24):
        super().__init__()
        self.config = SimpleNamespace(width=width, vocab=vocab, context=32)
        self.emb = nn.Embedding(vocab + 1, width)
        self.layers = nn.ModuleList([ToyBlock(width), ToyBlock(width)])
        self.final = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, idx, attention_mask=None):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.out(self.final(x))


def _load_toy(source, options):
    spec = json.loads((source / "toy.json").read_text())
    torch.manual_seed(spec["seed"])
    return ToyNet(width=spec["width"]), backbones.load_tokenizer(options.tokenizer or TOKENIZER_DIR)


TOY = BackboneKind(
    name="toy",
    lora_targets=r".*layers\.\d+\.mix",
    block_classes=lambda: (ToyBlock,),
    final_norm="final",
    hidden_size=lambda config: config.width,
    model_types=(f"{__name__}.ToyNet",),
    recognise=lambda path: (path / "toy.json").is_file(),
    load=_load_toy,
    mask_id=lambda model, tokenizer: model.config.vocab,
    max_length=lambda config: config.context,
    sources="a folder with toy.json",
)


@pytest.fixture
def toy_kind():
    register_backbone(TOY)
    yield TOY
    unregister_backbone(TOY.name)


def test_registry_round_trip_one_entry_is_enough(toy_kind, tmp_path):
    """A new kind registered here (no other file touched) is loaded, recognised through wrappers, hooked for the
    UPS head, LoRA-targeted and FSDP-wrapped."""
    (tmp_path / "toy.json").write_text(json.dumps({"seed": 0, "width": 24}))
    bb = load_backbone(tmp_path)
    assert bb.kind == "toy" and isinstance(bb.model, ToyNet) and bb.mask_id == 600 and not bb.model.training
    assert backbone_kind("toy") is toy_kind and kind_of(bb.model) is toy_kind
    assert hidden_size_of(bb.model) == 24 and max_length_of(bb.model) == 32
    assert final_norm(bb.model) is bb.model.final
    ids = torch.randint(0, 600, (2, 7))
    wrapped = UPSModel(bb.model, UPSHead(24, 4))
    assert kind_of(wrapped) is toy_kind
    out = wrapped(ids)
    assert out.confidences.shape == (2, 7)
    torch.testing.assert_close(out.logits, bb.model(ids))
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(bb.model, peft.LoraConfig(r=2, target_modules=kind_of(bb.model).lora_targets))
    assert kind_of(lora) is toy_kind and hidden_size_of(lora) == 24
    assert sorted(n for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)) == [
        "base_model.model.layers.0.mix", "base_model.model.layers.1.mix"]
    assert ToyBlock in fsdp_block_classes() and fsdp_block_classes(["toy"]) == {ToyBlock}
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(TOY)


def test_builtin_entries():
    from lit_gpt.model import Block
    from remedi_patches.llada import LLaDABlock

    assert fsdp_block_classes() >= {Block, LLaDABlock}
    smdm = TransEncoder.from_name("Diff_LLaMA_tiny", vocab_size=64, block_size=16)
    assert kind_of(smdm).name == "smdm" and hidden_size_of(smdm) == 64 and max_length_of(smdm) == 16
    assert final_norm(smdm) is smdm.transformer.ln_f
    llada = LLaDAModelLM(LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=64,
                                     vocab_size=100, embedding_size=100, max_sequence_length=48))
    assert kind_of(llada).name == "llada" and hidden_size_of(llada) == 32 and max_length_of(llada) == 48
    assert final_norm(llada) is llada.model.transformer.ln_f
    for model in (smdm, llada):
        names = [n for n, _ in model.named_modules()]
        hits = [n for n in names if re.fullmatch(kind_of(model).lora_targets, n)]
        assert hits and all(".lm_head" not in n and "transformer.ff_out" not in n for n in hits)
    assert kind_of(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="unknown backbone kind 'nope'"):
        backbone_kind("nope")


# ---------------------------------------------------------------- bad input


def test_local_path_or_hub_name_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert is_hub_name("GSAI-ML/LLaDA-8B-Base") and is_hub_name("org/name.v2")
    for local in ("./nope", "../x/y", "/abs/missing", "~/models/x", "runs/x", "a/b/c", "plain", "runs"):
        assert not is_hub_name(local), local
    for missing, fragment in (("./nope", "'./nope' does not exist"), (str(tmp_path / "abs"), "abs' does not exist"),
                              ("runs/x", "read as a local path because 'runs' exists"),
                              ("no_such_model", "not a hub name either")):
        with pytest.raises(FileNotFoundError, match=fragment) as err:
            load_backbone(missing)
        assert "hub is unreachable" not in str(err.value)


def test_nonfinite_llada_weights_are_refused_naming_file_and_tensor(tmp_path):
    torch.manual_seed(0)
    config = LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=64, vocab_size=600,
                         embedding_size=600, max_sequence_length=64)
    model = LLaDAModelLM(config)
    with torch.no_grad():
        model.model.transformer.blocks[0].up_proj.weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match="refusing to save the LLaDA model.*blocks.0.up_proj.weight"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # written anyway, as a diverged run could
    model.model.transformer.blocks[0].up_proj.weight.data.zero_()
    model.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.transformer.blocks.0.up_proj.weight' "
                                         r"holds NaN or inf"):
        load_backbone(_with_tokenizer(tmp_path))


def test_load_eval_model_takes_ups_head_path(tmp_path):
    from remedi_patches.backbones import load_eval_model
    from remedi_patches.modeling_wrappers import save_ups_head

    bb = load_backbone(None)
    d = hidden_size_of(bb.model)
    head_file = save_ups_head(tmp_path / "ups.safetensors", UPSHead(d, 0), {"mask_id": bb.mask_id})
    em = load_eval_model(None, device="cpu", ups_head_path=str(head_file))
    assert em.ups_head is not None and em.ups_head.hidden_size == d
    with pytest.raises(FileNotFoundError, match="ups_head path '.*nope.safetensors' does not exist"):
        load_eval_model(None, device="cpu", ups_head_path=str(tmp_path / "nope.safetensors"))
    with torch.no_grad():
        head = UPSHead(d, 0)
        head.net[0].weight.fill_(float("nan"))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "nan.safetensors"),
              metadata={"format": "remedi-ups-head", "meta": json.dumps({"hidden_size": d, "width": 0})})
    with pytest.raises(ValueError, match="nan.safetensors: tensor 'net.0.weight' holds NaN or inf"):
        load_eval_model(None, device="cpu", ups_head_path=str(tmp_path / "nan.safetensors"))


def test_folder_without_tokenizer_fails_before_the_weights_load(tmp_path, monkeypatch):
    import lit_gpt.model

    save_smdm_folder(TransEncoder.from_name("Diff_LLaMA_tiny", vocab_size=64, block_size=16), tmp_path)
    monkeypatch.setattr(lit_gpt.model, "load_smdm_folder", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(FileNotFoundError, match="holds no tokenizer .*pass --tokenizer"):
        load_backbone(tmp_path)


def test_hub_probe_skips_retries_without_network(monkeypatch):
    import socket

    from remedi_patches import sources

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in sources.PROXY_VARIABLES + ("HF_HUB_OFFLINE",):
        monkeypatch.delenv(name, raising=False)
    sources.hub_reachable.cache_clear()
    try:
        assert sources.hub_reachable() is False
        sources.hub_reachable.cache_clear()
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy nothing is probed
        assert sources.hub_reachable() is True
    finally:
        sources.hub_reachable.cache_clear()
