"""UPSHead, UPSModel (one forward, hidden state by output_hidden_states or by hook), head save/load,
hidden-size checks and LoRA loading."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from remedi_patches.modeling_wrappers import (RemeDiOutput, UPSModel, backbone_forward, check_head_fits,
                                              hidden_size_of, load_lora, load_ups_head, save_ups_head)
from remedi_patches.ups_head import UPSHead
from toy_models import D, MASK, PROMPT, BareToyMDM, ToyMDM

IDS = torch.cat([PROMPT, torch.full((1, 4), MASK)], dim=1)  # (1, 9)


def seeded_head(width, seed=0, d=D):
    torch.manual_seed(seed)
    return UPSHead(d, width).eval()


def counting_calls(model):
    """`model` with a `calls` counter of its forward calls (a hook: the model's own type and signature stay)."""
    model.calls = 0

    def count(module, args, kwargs):
        module.calls += 1

    model.register_forward_pre_hook(count, with_kwargs=True)
    return model


@pytest.mark.parametrize("width,n_params", [(0, D + 1), (8, D * 8 + 8 + 8 + 1)])
def test_head_shapes(width, n_params):
    head = seeded_head(width)
    assert sum(p.numel() for p in head.parameters()) == n_params
    h = torch.randn(3, 5, D)
    out = head(h)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    assert torch.allclose(head(h.bfloat16()), out, atol=0.1)  # runs on a bf16 backbone's hidden state
    assert (len(head.net) == 1) == (width == 0)
    with pytest.raises(ValueError, match="width >= 0"):
        UPSHead(D, -1)


@pytest.mark.parametrize("width", [0, 16])
def test_save_load_round_trip_is_bit_identical(tmp_path, width):
    head = seeded_head(width, seed=3)
    meta = {"mask_id": MASK, "backbone": "toy", "train_args": {"lr": 1e-4, "r_incorrect": 0.1}}
    path = save_ups_head(tmp_path / "heads" / "ups.safetensors", head, meta)
    loaded, loaded_meta = load_ups_head(path)
    h = torch.randn(2, 7, D)
    assert torch.equal(loaded(h), head(h))
    assert not loaded.training
    assert loaded_meta == {**meta, "hidden_size": D, "width": width, "format_version": 1}
    assert [p.name for p in path.parent.iterdir()] == ["ups.safetensors"]  # no temp file left behind
    folder = tmp_path / "run"
    save_ups_head(folder / "ups_head.safetensors", head, meta)
    assert torch.equal(load_ups_head(folder)[0](h), head(h))  # a folder means <folder>/ups_head.safetensors


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no UPS head"):
        load_ups_head(tmp_path / "nope.safetensors")
    good = save_ups_head(tmp_path / "good.safetensors", seeded_head(8), {})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_ups_head(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a tensor file at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_ups_head(garbage)
    pickle = tmp_path / "ups_head.pt"
    torch.save(seeded_head(0).state_dict(), pickle)
    with pytest.raises(ValueError, match="torch pickle"):
        load_ups_head(pickle)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a UPS head"):
        load_ups_head(other)
    wrong = tmp_path / "wrong.safetensors"
    meta = {"hidden_size": D, "width": 4, "format_version": 1}
    save_file({"net.0.weight": torch.zeros(1, D)}, str(wrong), metadata={"format": "remedi-ups-head",
                                                                         "meta": json.dumps(meta)})
    with pytest.raises(ValueError, match="do not match"):
        load_ups_head(wrong)


def test_nonfinite_heads_refused_on_save_and_load(tmp_path):
    head = seeded_head(4)
    good = save_ups_head(tmp_path / "ups.safetensors", head, {"mask_id": MASK})
    before = good.read_bytes()
    with torch.no_grad():
        head.net[2].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"refusing to save.*'net.2.bias' holds NaN or inf"):
        save_ups_head(good, head, {"mask_id": MASK})
    assert good.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ups.safetensors"]
    bad = tmp_path / "bad.safetensors"
    meta = {"hidden_size": D, "width": 4, "format_version": 1}
    tensors = {k: v.clone() for k, v in seeded_head(4).state_dict().items()}
    tensors["net.0.weight"][1, 2] = float("-inf")
    save_file(tensors, str(bad), metadata={"format": "remedi-ups-head", "meta": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"bad.safetensors: tensor 'net.0.weight' holds NaN or inf"):
        load_ups_head(bad)


def test_hidden_size_checks():
    assert hidden_size_of(ToyMDM()) == D
    model = nn.Linear(2, 2)  # of no registered kind: the convention is config.hidden_size
    model.config = SimpleNamespace(hidden_size=48)
    assert hidden_size_of(model) == 48
    model.config = SimpleNamespace(d_model=48)  # a registered kind's own key is not guessed for other modules
    with pytest.raises(ValueError, match="cannot read the hidden size.*register_backbone"):
        hidden_size_of(model)
    with pytest.raises(ValueError, match="cannot read the hidden size"):
        hidden_size_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=f"hidden size {D + 1}.*hidden size {D}"):
        check_head_fits(UPSHead(D + 1), ToyMDM())
    with pytest.raises(ValueError, match=f"hidden size 64.*hidden size {D}"):
        check_head_fits({"hidden_size": 64, "width": 0}, ToyMDM())
    with pytest.raises(ValueError, match="hidden size"):
        UPSModel(ToyMDM(), UPSHead(D + 1))


@pytest.mark.parametrize("model_cls", [ToyMDM, BareToyMDM])
def test_ups_model_one_forward(model_cls):
    backbone = counting_calls(model_cls().eval())
    head = seeded_head(8)
    model = UPSModel(backbone, head)
    assert model.config is backbone.config
    out = model(IDS)
    assert isinstance(out, RemeDiOutput) and isinstance(out, tuple)
    assert backbone.calls == 1
    _, hidden, logits = backbone.run(IDS)
    assert torch.equal(out.logits, logits)
    assert torch.equal(out.confidences, head(hidden))
    assert out.confidences.shape == IDS.shape


def test_hook_path_equals_explicit_hidden_state():
    hf_style, bare = ToyMDM().eval(), BareToyMDM().eval()  # same seed -> same weights
    am = torch.ones_like(IDS)
    logits_a, hidden_a = backbone_forward(hf_style, IDS, am, need_hidden=True)
    logits_b, hidden_b = backbone_forward(bare, IDS, am, need_hidden=True)
    assert torch.equal(hidden_a, hf_style(IDS, am, output_hidden_states=True).hidden_states[-1])
    assert torch.equal(hidden_b, hidden_a) and torch.equal(logits_b, logits_a)
    assert not bare.norm._forward_hooks  # the hook is removed after the forward
    assert backbone_forward(bare, IDS)[1] is None


def test_bare_model_without_final_norm_is_a_clear_error():
    class NoNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(MASK + 1, 4)

        def forward(self, idx, attention_mask=None):
            return self.emb(idx)

    with pytest.raises(ValueError, match="final norm"):
        backbone_forward(NoNorm(), IDS, need_hidden=True)


def test_smdm_trans_encoder_hook():
    lit_model = pytest.importorskip("lit_gpt.model")
    torch.manual_seed(0)
    backbone = counting_calls(lit_model.TransEncoder.from_name("Diff_LLaMA_tiny", vocab_size=64).eval())
    head = UPSHead(hidden_size_of(backbone), 8)
    ids = torch.randint(0, 64, (2, 10))
    out = UPSModel(backbone, head)(ids, attention_mask=torch.ones_like(ids))
    assert backbone.calls == 1 and out.confidences.shape == (2, 10)
    _, hidden = backbone_forward(backbone, ids, need_hidden=True)
    assert torch.allclose(backbone.lm_head(hidden), out.logits)  # the hook caught ln_f's output


def lora_toy(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], init_lora_weights=False)
    adapted = peft.get_peft_model(BareToyMDM(), config).eval()
    adapted.save_pretrained(str(tmp_path / "lora"))
    return adapted, tmp_path / "lora"


@pytest.mark.slow  # importing peft (and transformers) takes seconds
def test_load_lora_round_trip_and_hook_through_peft(tmp_path):
    adapted, folder = lora_toy(tmp_path)
    loaded = load_lora(BareToyMDM(), folder)
    expected = adapted(IDS)
    assert torch.equal(loaded(IDS), expected)
    assert not torch.equal(BareToyMDM()(IDS), expected)  # the adapter does change the model
    logits, hidden = backbone_forward(loaded, IDS, need_hidden=True)
    assert torch.equal(logits, expected) and hidden.shape == (1, IDS.shape[1], D)
    assert hidden_size_of(loaded) == D
    assert UPSModel(loaded, seeded_head(0))(IDS).confidences.shape == IDS.shape
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(BareToyMDM(), tmp_path / "missing")
