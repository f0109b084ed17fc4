"""--gradient_checkpointing (lit_gpt.training.apply_gradient_checkpointing) on every backbone the project trains:
the same loss and gradients with every transformer block (main and UPS) really recomputed in backward; the flag on
every trainer; the dual-stream blocks as FSDP units and in FSDP's checkpoint policy; short train_mdm and train_sft
runs."""
import json

import pytest
import torch
import torch.nn.functional as F

import lit_gpt.model
from lit_gpt.dual_stream import RemeDiTransEncoder
from lit_gpt.model import TransEncoder
from lit_gpt.training import FabricConfig, apply_gradient_checkpointing, make_strategy
from remedi_patches.backbones import fsdp_block_classes
from remedi_patches.cli import UserError
from remedi_patches.kv_cache import KVCache
from remedi_patches.modeling_wrappers import UPSHead, UPSModel
from test_llada_model import tiny_model as tiny_llada
from test_remedi_llada import tiny_remedi as tiny_llada_remedi
from test_remedi_smdm import live, tiny_config
from test_sft import addition_records, sft_args
from trainer_helpers import make_char_tokenizer, mdm_args, train_mdm, train_remedi, train_sft, write_pattern_data

pytestmark = pytest.mark.usefixtures("one_thread")

ON = FabricConfig(gradient_checkpointing=True)


def tiny_smdm() -> TransEncoder:
    torch.manual_seed(0)
    return TransEncoder(tiny_config(ups_positions=None))


def tiny_smdm_remedi() -> RemeDiTransEncoder:
    torch.manual_seed(0)
    return live(RemeDiTransEncoder(tiny_config()))  # live feedback: the UPS blocks move the logits too


BUILDERS = {"smdm": tiny_smdm, "smdm_remedi": tiny_smdm_remedi, "llada": tiny_llada, "llada_remedi": tiny_llada_remedi}
N_BLOCKS = {"smdm": 4, "smdm_remedi": 4 + 3, "llada": 2, "llada_remedi": 3 + 2}  # main + UPS blocks


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every transformer block (main and UPS): the modules FSDP wraps as units."""
    return [m for m in model.modules() if isinstance(m, tuple(fsdp_block_classes()))]


def count_block_runs(model: torch.nn.Module) -> list[int]:
    """Runs of each block, counted by a hook on its first layer (so a recompute inside a checkpoint counts too)."""
    runs = [0] * len(blocks_of(model))
    for k, block in enumerate(blocks_of(model)):
        next(block.children()).register_forward_hook(lambda *_, k=k: runs.__setitem__(k, runs[k] + 1))
    return runs


def train_step(name: str, checkpointing: bool) -> tuple[torch.Tensor, dict, list[int]]:
    """(loss, parameter gradients, runs of each block) of one float32 training step on a padded batch."""
    model = BUILDERS[name]().train()
    if checkpointing:
        apply_gradient_checkpointing(model, ON)
    runs = count_block_runs(model)
    g = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 90, (2, 8), generator=g), torch.randint(0, 90, (2, 8), generator=g)
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    out = model(ids, attention_mask=mask)
    loss = F.cross_entropy(getattr(out, "logits", out)[..., :90].flatten(0, 1), targets.flatten())
    if getattr(out, "confidences", None) is not None:
        loss = loss + out.confidences.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, runs


@pytest.mark.parametrize("name", BUILDERS)
def test_same_loss_and_gradients_with_every_block_recomputed(name):
    loss, grads, runs = train_step(name, checkpointing=False)
    loss_ckpt, grads_ckpt, runs_ckpt = train_step(name, checkpointing=True)
    assert runs == [1] * N_BLOCKS[name] and runs_ckpt == [2] * N_BLOCKS[name]  # UPS blocks recomputed too
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and all(g is not None for g in grads.values())
    for param in grads:
        torch.testing.assert_close(grads_ckpt[param], grads[param], msg=param)


@pytest.mark.parametrize("name", BUILDERS)
def test_no_recompute_in_eval_or_without_gradients(name):
    model = BUILDERS[name]().train()
    apply_gradient_checkpointing(model, ON)
    runs = count_block_runs(model)
    with torch.no_grad():
        model(torch.randint(0, 90, (1, 6)))
    model.eval()
    model(torch.randint(0, 90, (1, 6)))
    assert runs == [2] * N_BLOCKS[name]  # one run per forward


def test_smdm_block_writing_the_kv_cache_is_not_checkpointed():
    model = tiny_smdm_remedi().train()
    apply_gradient_checkpointing(model, ON)
    runs, cache = count_block_runs(model), KVCache()
    out = model(torch.randint(0, 90, (1, 6)), past_key_values=cache, use_cache=True)
    out.logits.sum().backward()  # a recompute would write the cache again
    assert runs == [1] * N_BLOCKS["smdm_remedi"] and len(cache) == 6


def test_flag_off_or_fsdp_leaves_the_model_alone_and_wrappers_are_seen_through():
    for cfg in (FabricConfig(), FabricConfig(gradient_checkpointing=True, strategy="fsdp")):
        smdm, llada = tiny_smdm(), tiny_llada()
        apply_gradient_checkpointing(smdm, cfg)
        apply_gradient_checkpointing(llada, cfg)
        assert not smdm.gradient_checkpointing and not llada.is_activation_checkpointing
    wrapped = UPSModel(tiny_llada(), UPSHead(64, 0))
    apply_gradient_checkpointing(wrapped, ON)
    assert wrapped.backbone.is_activation_checkpointing
    assert not getattr(wrapped.backbone, "_require_grads_hooks", None)  # a frozen backbone builds no graph
    with pytest.raises(UserError, match="--gradient_checkpointing: Linear has no gradient checkpointing"):
        apply_gradient_checkpointing(torch.nn.Linear(2, 2), ON)


# ---------------------------------------------------------------- FSDP: units and checkpoint policy


def test_every_dual_stream_block_is_an_fsdp_unit():
    smdm, llada = tiny_smdm_remedi(), tiny_llada_remedi()
    units = tuple(fsdp_block_classes())
    for j, block in enumerate(smdm.ups.h):
        assert isinstance(block, units), f"ups.h.{j}"
    for j, block in enumerate(llada.model.blocks_upm):
        assert isinstance(block, units), f"model.blocks_upm.{j}"
    assert len(blocks_of(smdm)) == N_BLOCKS["smdm_remedi"] and len(blocks_of(llada)) == N_BLOCKS["llada_remedi"]


def test_fsdp_strategy_checkpoints_the_block_classes_with_the_flag():
    classes = fsdp_block_classes()
    on = make_strategy("fsdp", devices=8, num_nodes=1, cpu=False, wrap_blocks=classes, checkpoint_blocks=True)
    assert on._fsdp_kwargs["auto_wrap_policy"]._module_classes == classes
    assert on._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == classes
    off = make_strategy("fsdp", devices=8, num_nodes=1, cpu=False, wrap_blocks=classes)
    assert off._activation_checkpointing_kwargs == {}


# ---------------------------------------------------------------- the trainers


def test_flag_on_every_trainer(capsys):
    assert train_mdm.parse_args(["--gradient_checkpointing"]).gradient_checkpointing
    assert not train_mdm.parse_args([]).gradient_checkpointing
    assert train_sft.parse_args(["--gradient_checkpointing"]).gradient_checkpointing
    assert not train_sft.parse_args([]).gradient_checkpointing
    assert train_remedi.parse_config(["--gradient_checkpointing"]).gradient_checkpointing
    assert not train_remedi.parse_config([]).gradient_checkpointing
    assert "--gradient_checkpointing" in train_remedi.build_parser().format_help()
    for parse in (train_mdm.parse_args, train_sft.parse_args):
        with pytest.raises(SystemExit):
            parse(["--help"])
        assert "--gradient_checkpointing" in capsys.readouterr().out


def trainer_args(trainer: str, root) -> list[str]:
    """Two optimizer steps of two micro-batches of the tiny 2-layer SMDM model, on CPU."""
    if trainer == "mdm":
        data = write_pattern_data(root / "data", n_tokens=1024)
        return mdm_args(data, root / "out", max_steps=2, warmup_steps=1, save_interval=10)
    root.mkdir()
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in addition_records(16)) + "\n")
    make_char_tokenizer(root / "tok")
    return sft_args(data, root / "tok", root / "out", max_steps=2, warmup_steps=1, save_interval=10)


@pytest.mark.parametrize("trainer", ["mdm", "sft"])
def test_trainer_gives_the_same_losses_with_checkpointing(trainer, tmp_path, monkeypatch):
    calls = []
    real = lit_gpt.model.checkpoint
    monkeypatch.setattr(lit_gpt.model, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    main = {"mdm": train_mdm.main, "sft": train_sft.main}[trainer]
    plain = main(trainer_args(trainer, tmp_path / "plain"))
    assert len(plain) == 2 and not calls
    ckpt = main(trainer_args(trainer, tmp_path / "ckpt") + ["--gradient_checkpointing"])
    assert len(calls) == 2 * 2 * 2  # steps x micro-batches x layers of Diff_LLaMA_tiny
    torch.testing.assert_close(ckpt, plain)
