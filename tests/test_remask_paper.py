"""Remask SFT the paper's way (issue 12; remedi_patches.remask_sft, CLI SMDM/pretrain/train_remedi.py): --train_mode
full on a backbone with a head and on dual-stream RemeDi models (SMDM and LLaDA), ups_only on a dual-stream model,
--ups_grad_to_lora, --recipe paper (its values, kill / resume, 2-process DDP), block-diffusion rows reaching the
model, the exported model folders, and the errors. Tiny float32 models on the CPU; the fixtures of
test_train_remedi (`root`: a tiny LLaDA, a tiny SMDM, a character tokenizer and sums.jsonl) plus two dual-stream
models built here."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lit_gpt.training as training
import test_train_remedi
from char_tokenizer import char_tokenizer
from lit_gpt.diffusion import seeded_generator
from remedi_patches.backbones import load_backbone
from remedi_patches.block_layout import build_rows
from remedi_patches.cli import run_main
from remedi_patches.losses import remask_losses
from remedi_patches.modeling_wrappers import has_ups_stream, load_ups_head, save_ups_head, ups_stream_parts
from remedi_patches.noise import block_remask_noise, context_incorrect_noise, noise_special_ids
from remedi_patches.remask_sft import (PAPER_RECIPE, STREAM_NOISE, RemaskStep, load_split_records,
                                       remask_forward, run, sample_indices, split_train_eval)
from remedi_patches.ups_head import UPSHead
from test_train_remedi import csv_rows, make_cfg, snapshot
from trainer_helpers import REPO, killed_after_first_checkpoint, train_remedi

pytestmark = pytest.mark.usefixtures("one_thread")
root = test_train_remedi.root  # the module-scoped fixture, shared: tiny LLaDA / SMDM, char tokenizer, sums.jsonl
PAPER_SEQ_LEN = 48  # no answer of sums.jsonl is cut: 16 or 24 answer tokens once padded to blocks of 8
PAPER = dict(recipe="paper", seq_len=PAPER_SEQ_LEN, block_length=8, eval_samples=0, warmup_steps=0)
MAIN, FEEDBACK, UPS = "main", "feedback", "ups"


@pytest.fixture(scope="module")
def remedi_root(root) -> Path:
    """`root` plus mixed.jsonl (sums of 1 to 3 digits: answers of 2 or 3 blocks of 8) and two dual-stream RemeDi
    folders with the character tokenizer: smdm_remedi (the tiny SMDM with a UPS stream after layers 0 and 1,
    lit_gpt.dual_stream.remedi_from_backbone) and llada_remedi (a 2-layer LLaDA RemeDi, UPS blocks after layers 0
    and 1); both with zero feedback, as fresh RemeDi models start."""
    from lit_gpt.dual_stream import remedi_from_backbone
    from lit_gpt.model import save_smdm_folder
    from remedi_patches.llada import RemeDiConfig, RemeDiUPMModelLM

    rng = random.Random(1)
    with open(root / "mixed.jsonl", "w") as f:
        for _ in range(40):
            a, b = (rng.choice([rng.randint(1, 9), rng.randint(10, 999)]) for _ in range(2))
            f.write(json.dumps({"question": f"{a}+{b}", "answer": f"{a}+{b}={a + b}. #### {a + b}"}) + "\n")
    tok = char_tokenizer()
    save_smdm_folder(remedi_from_backbone(load_backbone(root / "smdm").model, ups_positions=[0, 1]),
                     root / "smdm_remedi")
    tok.save_pretrained(root / "smdm_remedi")
    torch.manual_seed(0)
    config = RemeDiConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=len(tok),
                          embedding_size=len(tok), max_sequence_length=128, rope_theta=10000.0,
                          mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.eos_token_id, ups_positions=[0, 1])
    RemeDiUPMModelLM(config).save_pretrained(root / "llada_remedi")
    tok.save_pretrained(root / "llada_remedi")
    return root


def paper_cfg(root: Path, out: str, model: str = "smdm_remedi", **kw):
    """make_cfg with --recipe paper on `model` (a folder of root), blocks of 8, no held-out evaluation, no warmup."""
    return make_cfg(root, out, model_name=str(root / model), **{**PAPER, **kw})


def parts(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> MAIN / FEEDBACK / UPS of a dual-stream model (remedi_patches.modeling_wrappers)."""
    stream, feedback = (set(map(id, p)) for p in ups_stream_parts(model))
    return {n: UPS if id(p) in stream else FEEDBACK if id(p) in feedback else MAIN for n, p in model.named_parameters()}


def max_change(before: dict, after: dict) -> dict[str, float]:
    return {k: float((after[k] - before[k]).abs().max()) for k in before}


def sums_batch(backbone, seed: int = 0, r_incorrect: float = 0.5):
    """Three [prompt | clean | noisy] block-diffusion rows (blocks of 8) of sums and their context noise."""
    tok, eos = backbone.tokenizer, backbone.eos_id
    pairs = [("3+4", "3+4=7. #### 7"), ("12+30", "12+30=42. #### 42"), ("9+9", "9+9=18. #### 18")]
    prompts = [tok(f"Question: {q}\nAnswer:")["input_ids"] for q, _ in pairs]
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [eos] for _, a in pairs]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.tensor([p + a + [eos] * (width - len(p) - len(a)) for p, a in zip(prompts, answers)])
    rows = build_rows(ids, torch.tensor([len(p) for p in prompts]), torch.tensor([len(a) for a in answers]),
                      "block_diffusion", 8, eos)
    special = noise_special_ids(tok, backbone.mask_id, eos, backbone.eot_id)
    gen = torch.Generator().manual_seed(seed)
    noise = block_remask_noise(rows.input_ids, rows.answer_mask, rows.block_index, backbone.mask_id, r_incorrect,
                               len(tok), special, generator=gen)
    noise = context_incorrect_noise(rows.input_ids, noise, backbone.mask_id, len(tok), special, gen)
    assert noise.masked.any() and noise.incorrect.any()
    return rows, noise


def ups_loss_grads(model, head, rows, noise, to_backbone: bool = True) -> dict[str, bool]:
    """Backward of the UPS loss ALONE of one 'full' forward -> parameter name -> whether its gradient is non-zero."""
    model.zero_grad(set_to_none=True)
    losses, _ = remask_forward(model, head, noise, rows, "full", 0.3, 0.05, ups_grad_to_backbone=to_backbone)
    losses.ups.backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


# ---------------------------------------------------------------- full mode


def test_ups_loss_alone_reaches_every_backbone_weight_but_the_lm_head_through_the_head(root):
    """Backbone + head in full mode: the head reads the last hidden state with its gradient, so the UPS loss
    alone reaches every backbone weight but the LM head (the UPS labels' p_TPS is stop-gradient); with the
    detached hidden state (ups_only / joint) it reaches none."""
    backbone = load_backbone(root / "llada")
    model = backbone.model.train().requires_grad_(True)
    rows, noise = sums_batch(backbone)
    torch.manual_seed(0)
    head = UPSHead(32, 8)
    grads = ups_loss_grads(model, head, rows, noise)
    lm_head = "model.transformer.ff_out.weight"
    assert {n for n, g in grads.items() if not g} == {lm_head}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert not any(ups_loss_grads(model, head, rows, noise, to_backbone=False).values())


def test_ups_loss_alone_reaches_the_main_stream_of_a_dual_stream_model():
    """Dual-stream SMDM (3 layers, UPS blocks after layers 0 and 1). The UPS blocks read the main stream's state, so
    the UPS loss alone reaches the main stream upstream of the last UPS block even with the zero feedback of a
    fresh model (and feedback 0, whose output main block 1 and then UPS block 1 read); the feedback norms get
    gradient only once the feedback linears are non-zero (after full updates); what only the TPS logits read
    (main block 2, ln_f, lm_head, feedback 1 and its norm) never gets any."""
    from lit_gpt.config import Config
    from lit_gpt.dual_stream import remedi_from_backbone
    from lit_gpt.model import TransEncoder
    from remedi_patches.backbones import Backbone

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = remedi_from_backbone(TransEncoder(Config.from_name(
        "Diff_LLaMA_tiny", n_layer=3, vocab_size=len(tok), n_embd=32, n_head=2, intermediate_size=64,
        block_size=128)), ups_positions=[0, 1]).train()
    backbone = Backbone(model=model, tokenizer=tok, kind="smdm", name="tiny", mask_id=model.config.mask_id,
                        eos_id=tok.eos_token_id, eot_id=None)
    rows, noise = sums_batch(backbone)
    never = {n for n, _ in model.named_parameters()
             if n.startswith(("transformer.h.2.", "transformer.ln_f.", "lm_head.", "ups.feedback.1.",
                              "ups.feedback_norm.1."))}
    fresh = ups_loss_grads(model, None, rows, noise)
    assert {n for n, g in fresh.items() if not g} == never | {"ups.feedback_norm.0.weight"}
    assert fresh["transformer.wte.weight"] and fresh["transformer.h.0.attn.attn.weight"]
    assert fresh["transformer.h.1.mlp.swiglu.w3.weight"] and fresh["ups.feedback.0.weight"]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in (1, 2):  # two full updates on TPS + 0.3 UPS: the feedback linears leave zero
        rows_s, noise_s = sums_batch(backbone, seed)
        remask_forward(model, None, noise_s, rows_s, "full", 0.3, 0.05)[0].total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(model.ups.feedback[j].weight.abs().sum() > 0 for j in (0, 1))
    trained = ups_loss_grads(model, None, rows, noise)
    assert {n for n, g in trained.items() if not g} == never  # feedback_norm.0 now has gradient too


def run_with_snapshots(cfg, backbone, *modules) -> tuple[dict, list[list[dict]]]:
    """run(cfg) with a checkpoint after every update (cfg.save_every 1) -> (summary, [[snapshot of each module]
    before training, after update 1, 2, ...])."""
    snaps = [[snapshot(m) for m in modules]]
    real_save = training.save_checkpoint

    def save_and_snapshot(fabric, path, state):
        snaps.append([snapshot(m) for m in modules])
        return real_save(fabric, path, state)

    training.save_checkpoint = save_and_snapshot
    try:
        return run(cfg, backbone=backbone), snaps
    finally:
        training.save_checkpoint = real_save


def test_full_mode_moves_every_backbone_weight_at_lr_backbone_and_the_head_at_lr(root):
    """LLaDA with a head, full mode: every backbone tensor trains, at --lr_backbone (Adam's first update moves each
    weight by lr x sign(gradient): the largest change of each tensor is its lr), and the head trains beside it."""
    backbone = load_backbone(root / "llada")
    torch.manual_seed(3)
    start_head = root / "full_start_head.safetensors"
    save_ups_head(start_head, UPSHead(32, 8), {"mask_id": backbone.mask_id})
    head = load_ups_head(start_head)[0]
    cfg = paper_cfg(root, "full_llada", model="llada", max_steps=3, save_every=1, lr=1e-2, lr_backbone=1e-3,
                    load_ups_head=str(start_head))
    out, snaps = run_with_snapshots(cfg, backbone, backbone.model)
    assert len(snaps) == 4 and snaps[0][0].keys() == snaps[-1][0].keys()
    first = max_change(snaps[0][0], snaps[1][0])
    assert first == pytest.approx(dict.fromkeys(first, 1e-3), rel=1e-3)  # every backbone tensor, at lr_backbone
    assert all(p.requires_grad for p in backbone.model.parameters())
    assert (out["tps_updates"], out["ups_updates"]) == (3, 3)
    trained, meta = load_ups_head(out["head_path"])
    assert meta["backbone"] == out["model_dir"] and meta["train_args"]["train_mode"] == "full"
    assert all(not torch.equal(a, b) for a, b in zip(head.state_dict().values(), trained.state_dict().values()))


def test_full_mode_on_a_dual_stream_model_trains_every_part_at_its_learning_rate(remedi_root):
    """One optimizer: the UPS stream and the feedback at --lr, the main stream at --lr_backbone (the largest change
    of a tensor in Adam's first update is its lr). The zero feedback gives its norms no gradient in update 1; they
    move later."""
    backbone = load_backbone(remedi_root / "smdm_remedi")
    names = parts(backbone.model)
    _, snaps = run_with_snapshots(paper_cfg(remedi_root, "full_dual", max_steps=3, save_every=1, lr=1e-2,
                                            lr_backbone=1e-3), backbone, backbone.model)
    assert len(snaps) == 4
    first = max_change(snaps[0][0], snaps[1][0])
    norms = {n for n in names if n.startswith("ups.feedback_norm.")}
    assert norms and all(first[n] == 0 for n in norms)
    lr = {MAIN: 1e-3, FEEDBACK: 1e-2, UPS: 1e-2}
    assert {n: first[n] for n in names if n not in norms} == pytest.approx(
        {n: lr[part] for n, part in names.items() if n not in norms}, rel=1e-3)
    last = max_change(snaps[0][0], snaps[-1][0])
    assert [n for n in names if last[n] == 0] == []  # every tensor trained, the feedback norms included


# ---------------------------------------------------------------- ups_only on a dual-stream model


@pytest.mark.parametrize("model, layout", [("smdm_remedi", "block_diffusion"), ("llada_remedi", "sequence")])
def test_dual_stream_ups_only_trains_the_ups_stream_alone_and_exports_the_same_tps(remedi_root, model, layout):
    backbone = load_backbone(remedi_root / model)
    names = parts(backbone.model)
    before = snapshot(backbone.model)
    out = run(paper_cfg(remedi_root, f"ups_only_{model}", model=model, train_mode="ups_only", max_steps=3,
                        layout=layout, eval_samples=16), backbone=backbone)
    after = snapshot(backbone.model)
    assert {n for n, part in names.items() if part != UPS and not torch.equal(before[n], after[n])} == set()
    assert {n for n, part in names.items() if part == UPS and torch.equal(before[n], after[n])} == set()
    assert (out["tps_updates"], out["ups_updates"], out["head_path"]) == (0, 3, None)
    assert 0 <= out["eval_auc"] <= 1 and out["eval_incorrect_tokens"] > 0  # held out: the model's own confidences

    exported = load_backbone(out["model_dir"]).model.eval()
    state = exported.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in after)
    start = load_backbone(remedi_root / model).model.eval()
    ids = torch.randint(5, 90, (2, 20))
    with torch.no_grad():
        new, old = exported(ids), start(ids)
    assert torch.equal(new.logits, old.logits)  # the TPS is exactly the starting model's
    assert not torch.allclose(new.confidences, old.confidences)


# ---------------------------------------------------------------- --ups_grad_to_lora


def test_ups_grad_to_lora_lets_the_ups_loss_reach_the_adapter(root):
    """Joint mode on the tiny SMDM with a head: with --ups_grad_to_lora the UPS loss alone gives every LoRA weight a
    gradient (and changes the trajectory from update 2 on), without it none (mirrors the joint round-trip test)."""
    common = dict(model_name=str(root / "smdm"), train_mode="joint", max_steps=3, lora_dropout=0.0, eval_samples=0,
                  layout="block_diffusion", block_length=8, seq_len=PAPER_SEQ_LEN)
    plain = run(make_cfg(root, "joint_plain", **common), backbone=load_backbone(root / "smdm"))
    backbone = load_backbone(root / "smdm")
    flagged = run(make_cfg(root, "joint_ups_to_lora", ups_grad_to_lora=True, **common), backbone=backbone)
    assert flagged["losses"][0] == pytest.approx(plain["losses"][0], abs=1e-6)  # same start, same batch
    assert flagged["losses"][1:] != pytest.approx(plain["losses"][1:], abs=1e-6)

    model = backbone.model.train()
    head, _ = load_ups_head(flagged["head_path"])
    rows, noise = sums_batch(backbone)
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for n, p in model.named_parameters() if n in lora)
    for to_lora in (True, False):
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        losses, _ = remask_forward(model, head, noise, rows, "joint", 1.0, ups_grad_to_backbone=to_lora)
        losses.ups.backward()
        moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert moved == (lora if to_lora else set()), to_lora
        assert all(p.grad.abs().sum() > 0 for p in head.parameters())


# ---------------------------------------------------------------- --recipe paper: kill / resume, DDP


@pytest.mark.parametrize("model", ["smdm_remedi", "llada"])
def test_killed_paper_run_resumes_same_losses_and_model(remedi_root, model):
    """--recipe paper (block_diffusion rows, context incorrect tokens, full mode) on the dual-stream SMDM and on
    LLaDA with a head: killed after its first checkpoint and resumed, a run continues the uninterrupted run's
    trajectory to the same model (and head)."""
    load = lambda: load_backbone(remedi_root / model)  # noqa: E731
    full = run(paper_cfg(remedi_root, f"paper_uninterrupted_{model}", model=model, max_steps=6, warmup_steps=2),
               backbone=load())
    cfg = paper_cfg(remedi_root, f"paper_killed_{model}", model=model, max_steps=6, warmup_steps=2, save_every=3)
    killed_after_first_checkpoint(cfg, load)
    assert [p.name for p in Path(cfg.out_dir).glob("iter-*-ckpt.pth")] == ["iter-000003-ckpt.pth"]
    resumed = run(cfg, backbone=load())
    assert resumed["updates"] == 6 and len(resumed["losses"]) == 3
    assert resumed["losses"] == pytest.approx(full["losses"][3:], abs=1e-6)
    rows = [csv_rows(out["metrics_csv"]) for out in (full, resumed)]
    for key in ("tps_loss", "ups_loss", "mask_frac", "incorrect_frac"):
        assert [float(r[key]) for r in rows[1]] == pytest.approx([float(r[key]) for r in rows[0][3:]], abs=1e-6)
    a = load_file(Path(full["model_dir"]) / "model.safetensors")
    b = load_file(Path(resumed["model_dir"]) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    start = load_file(remedi_root / model / "model.safetensors")
    assert start.keys() == a.keys() and all(not torch.equal(a[k], start[k]) for k in a)  # every tensor trained
    if model == "llada":
        heads = [load_ups_head(out["head_path"])[0].state_dict() for out in (full, resumed)]
        assert all(torch.allclose(heads[0][k], heads[1][k], atol=1e-6) for k in heads[0])


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_paper_recipe(remedi_root):
    """2 CPU processes (DDP, gloo) x batch 2 follow 1 process x batch 4 on the dual-stream SMDM with --recipe paper:
    same rows, noise and context pool (drawn for the global batch), same updates. Answers of 1 to 3 blocks give
    the ranks different numbers of scored tokens: the UPS loss and the logged fractions are still the global
    batch's token means (each micro-batch divides by the global count / its number of parts)."""
    common = ["--model_name", str(remedi_root / "smdm_remedi"), "--dataset", str(remedi_root / "mixed.jsonl"),
              "--recipe", "paper", "--seq_len", "64", "--block_length", "8", "--max_steps", "3",
              "--warmup_steps", "1", "--eval_samples", "0", "--accelerator", "cpu", "--precision", "32-true",
              "--seed", "7", "--lr", "1e-2", "--lr_backbone", "3e-3"]
    one = train_remedi.main(common + ["--batch_size", "4", "--out_dir", str(remedi_root / "paper_ddp1")])
    proc = subprocess.run([sys.executable, str(REPO / "SMDM" / "pretrain" / "train_remedi.py"), *common,
                           "--batch_size", "2", "--devices", "2", "--strategy", "ddp", "--out_dir",
                           str(remedi_root / "paper_ddp2")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = csv_rows(str(remedi_root / "paper_ddp2" / "logs" / "version_0" / "metrics.csv"))
    ref = csv_rows(one["metrics_csv"])
    for key in ("loss", "tps_loss", "ups_loss", "mask_frac", "incorrect_frac"):
        assert [float(r[key]) for r in two] == pytest.approx([float(r[key]) for r in ref], rel=1e-5, abs=1e-6), key
    a = load_file(Path(one["model_dir"]) / "model.safetensors")
    b = load_file(remedi_root / "paper_ddp2" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---------------------------------------------------------------- --recipe paper: values, errors


def test_recipe_paper_resolves_to_its_values_and_flags_given_win(remedi_root):
    dual = str(remedi_root / "smdm_remedi")
    cfg = train_remedi.parse_config(["--model_name", dual, "--recipe", "paper"])
    assert {k: getattr(cfg, k) for k in PAPER_RECIPE} == PAPER_RECIPE
    assert (cfg.lr, cfg.lr_backbone, cfg.block_length) == (2e-6, None, 32)  # the paper's lr for LLaDA-8B
    embedded = train_remedi.parse_config(["--recipe", "paper"])
    assert {k: getattr(embedded, k) for k in PAPER_RECIPE} == PAPER_RECIPE
    assert (embedded.lr, embedded.seq_len) == (1e-3, 72)  # the embedded backbone's SFT peak, the demo's window
    given = train_remedi.parse_config(["--model_name", dual, "--recipe", "paper", "--lambda_ups", "1.0", "--layout",
                                       "sequence", "--lr", "0.5", "--warmup_steps", "0"])
    assert {k: getattr(given, k) for k in PAPER_RECIPE} == {**PAPER_RECIPE, "lambda_ups": 1.0, "layout": "sequence",
                                                             "warmup_steps": 0}
    assert given.lr == 0.5
    plain = train_remedi.parse_config(["--model_name", dual])
    assert (plain.layout, plain.train_mode, plain.incorrect_source, plain.lambda_ups) == (
        "sequence", "ups_only", "uniform", 1.0)


def test_paper_run_prints_the_resolved_values(remedi_root, capsys):
    common = ["--model_name", str(remedi_root / "smdm_remedi"), "--dataset", str(remedi_root / "sums.jsonl"),
              "--recipe", "paper", "--seq_len", str(PAPER_SEQ_LEN), "--max_steps", "1", "--eval_samples", "0",
              "--batch_size", "2", "--accelerator", "cpu", "--precision", "32-true"]
    train_remedi.main(common + ["--out_dir", str(remedi_root / "printed_paper")])
    text = capsys.readouterr().out
    assert "Remask SFT (full, block_diffusion rows, recipe paper)" in text
    assert ("  layout block_diffusion, incorrect_source context, label_smoothing 0.05, lambda_ups 0.3, train_mode "
            "full, min_lr_ratio 0.5, warmup_steps 50, lr 2e-06, lr_backbone 2e-06\n") in text
    train_remedi.main(common + ["--lambda_ups", "1.0", "--layout", "sequence", "--out_dir",
                                str(remedi_root / "printed_given")])
    text = capsys.readouterr().out
    assert "Remask SFT (full, sequence rows, recipe paper)" in text
    assert "  layout sequence, incorrect_source context, label_smoothing 0.05, lambda_ups 1.0, train_mode full" in text


def user_error(argv: list[str], capsys) -> str:
    """The one `error:` line (exit 2) that the CLI prints for argv."""
    with pytest.raises(SystemExit) as exc:
        run_main(train_remedi.main, argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # datasets may print progress too
    assert exc.value.code == 2 and len(errors) == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.mark.parametrize("extra, match", [
    (["--train_mode", "joint"], "--train_mode joint trains LoRA beside a UPS head; .* is a dual-stream RemeDi .*"
                                "use --train_mode full or ups_only"),
    (["--train_mode", "alternating"], "--train_mode alternating trains LoRA"),
    (["--load_ups_head", "HEAD"], "--load_ups_head applies to a UPS head or LoRA; .* drop it"),
    (["--save_path", "OUT/head.safetensors"], "--save_path applies to a UPS head or LoRA"),
    (["--ups_grad_to_lora"], "--ups_grad_to_lora applies to --train_mode joint only \\(got full\\)"),
    (["--block_length", "64"], "--layout block_diffusion makes rows of up to \\d+ tokens .* beyond the model's "
                               "context of 128; lower --seq_len"),
], ids=["joint", "alternating", "load_ups_head", "save_path", "ups_grad_to_lora", "row_too_long"])
def test_paper_recipe_errors_on_a_dual_stream_model_are_one_line(remedi_root, tmp_path, capsys, extra, match):
    head = tmp_path / "head.safetensors"
    save_ups_head(head, UPSHead(32, 0), {"mask_id": 0})
    extra = [x.replace("HEAD", str(head)).replace("OUT", str(tmp_path)) for x in extra]
    argv = ["--model_name", str(remedi_root / "smdm_remedi"), "--dataset", str(remedi_root / "sums.jsonl"),
            "--recipe", "paper", "--seq_len", str(PAPER_SEQ_LEN), "--max_steps", "1", "--eval_samples", "0",
            "--accelerator", "cpu", "--precision", "32-true", "--out_dir", str(tmp_path / "out"), *extra]
    line = user_error(argv, capsys)
    assert re.search(match, line), line
    assert not (tmp_path / "out" / "model").exists()


# ---------------------------------------------------------------- block-diffusion rows reach the model


def test_block_diffusion_rows_reach_the_model_and_the_step_losses_are_the_direct_computation(remedi_root,
                                                                                              monkeypatch):
    """One paper-recipe update on the dual-stream SMDM: the model gets the noisy rows with the 4-D block-causal
    mask and the noisy copy at the clean answer's positions, as build_rows + block_remask_noise +
    context_incorrect_noise give them for (--seed, update 0); the logged TPS and UPS losses are remask_losses of
    the starting model's forward on them."""
    backbone = load_backbone(remedi_root / "smdm_remedi")
    tok, eos, mask_id = backbone.tokenizer, backbone.eos_id, backbone.mask_id
    calls, plans = [], []
    backbone.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].clone(), kwargs["attention_mask"].clone(),
                                                   kwargs["position_ids"].clone())), with_kwargs=True)
    real_plan = RemaskStep.plan
    monkeypatch.setattr(RemaskStep, "plan", lambda self, step: plans.append(real_plan(self, step)) or plans[-1])
    cfg = paper_cfg(remedi_root, "paper_rows", max_steps=1, dataset=str(remedi_root / "mixed.jsonl"), seq_len=64)
    out = run(cfg, backbone=backbone)
    assert len(calls) == 1 and len(plans) == 1

    examples, _ = split_train_eval(cfg, tok, load_split_records(cfg))
    idx = sample_indices(cfg.seed, len(examples), 0, cfg.batch_size)
    rows = build_rows(examples.input_ids[idx], examples.prompt_len[idx], examples.answer_tokens[idx],
                      "block_diffusion", 8, eos)
    special = noise_special_ids(tok, mask_id, eos, backbone.eot_id)
    gen = seeded_generator(cfg.seed, STREAM_NOISE, 0)
    noise = block_remask_noise(rows.input_ids, rows.answer_mask, rows.block_index, mask_id, cfg.r_incorrect,
                               len(tok), special, generator=gen, eps=cfg.eps)
    noise = context_incorrect_noise(rows.input_ids, noise, mask_id, len(tok), special, gen)
    assert len(set(rows.answer_len.tolist())) > 1 and len(set(rows.length.tolist())) > 1  # batch padding
    assert (rows.block_index.max(1).values > 0).all()  # two answer blocks or more in every row

    ids, attention, positions = calls[0]
    assert attention.dtype == torch.bool and attention.shape == (4, 1, ids.shape[1], ids.shape[1])
    assert torch.equal(ids, noise.noisy) and torch.equal(attention, rows.attention_mask)
    assert torch.equal(positions, rows.position_ids)
    assert all(torch.equal(a, b) for a, b in zip(plans[0][0], rows) if a is not None)
    assert all(torch.equal(a, b) for a, b in zip(plans[0][1], noise))
    for b in range(4):
        p, a = int(examples.prompt_len[idx[b]]), int(rows.answer_len[b])
        assert torch.equal(positions[b, p + a:p + 2 * a], torch.arange(p, p + a))  # noisy copy = clean answer's
        assert torch.equal(positions[b, :p + a], torch.arange(p + a))
        q = p + a + 8  # first noisy token of block 1: the prompt, clean block 0, its own noisy block, nothing else
        keys = torch.zeros(ids.shape[1], dtype=torch.bool)
        keys[:p + 8] = True
        keys[q:q + 8] = True
        assert torch.equal(attention[b, 0, q], keys), b

    start = load_backbone(remedi_root / "smdm_remedi").model.train()
    with torch.no_grad():
        forward = start(noise.noisy, attention_mask=rows.attention_mask, position_ids=rows.position_ids)
    losses = remask_losses(forward.logits, forward.confidences, rows.input_ids, noise.noisy, noise.masked,
                           noise.incorrect, noise.p_mask, rows.answer_mask, rows.answer_len, 0.3, 0.05)
    logged = csv_rows(out["metrics_csv"])[0]
    assert [float(logged[k]) for k in ("tps_loss", "ups_loss", "loss")] == pytest.approx(
        [float(losses.tps), float(losses.ups), float(losses.total)], rel=1e-5)


# ---------------------------------------------------------------- exported model folders


@pytest.mark.parametrize("model", ["llada", "llada_remedi", "smdm_remedi"])
def test_exported_model_reloads_with_the_last_checkpoints_weights(remedi_root, model):
    """A full-mode paper run's --save_model_dir folder (LLaDA with a head, the dual-stream LLaDA and SMDM) loads
    with load_backbone as the same kind of model, holding the newest checkpoint's weights and the tokenizer."""
    backbone = load_backbone(remedi_root / model)
    out = run(paper_cfg(remedi_root, f"export_{model}", model=model, max_steps=2, save_every=1), backbone=backbone)
    checkpoint = training.latest_checkpoint(remedi_root / f"export_{model}")
    assert checkpoint.name == "iter-000002-ckpt.pth"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    exported = load_backbone(out["model_dir"])
    state = exported.model.state_dict()
    assert type(exported.model) is type(backbone.model) and exported.kind == backbone.kind
    assert has_ups_stream(exported.model) == (model != "llada") and (out["head_path"] is None) == (model != "llada")
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    trained = backbone.model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained)  # the model the run ended with
    assert (exported.mask_id, exported.eos_id) == (backbone.mask_id, backbone.eos_id)
    assert exported.tokenizer("12+30=42")["input_ids"] == backbone.tokenizer("12+30=42")["input_ids"]
