"""Remask SFT trainer (remedi_patches.remask_sft, CLI SMDM/pretrain/train_remedi.py) on tiny backbones: ups_only / joint / alternating,
head and adapter round trips, resume, flags and errors."""
import csv
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from remedi_patches.backbones import load_backbone
from remedi_patches.modeling_wrappers import load_lora, load_ups_head, save_ups_head
from remedi_patches.noise import apply_remask_noise
from remedi_patches.ups_head import UPSHead
from char_tokenizer import char_tokenizer

import lit_gpt.training as training
from remedi_patches.block_layout import plain_rows
from remedi_patches.remask_sft import (RemaskConfig, propose_incorrect, remask_forward, run, step_kind,
                                       update_counts)
from trainer_helpers import REPO, killed_after_first_checkpoint, train_remedi

SEQ_LEN = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remask")
    rng = random.Random(0)
    with open(root / "sums.jsonl", "w") as f:
        for _ in range(120):
            a, b = rng.randint(1, 49), rng.randint(1, 49)
            f.write(json.dumps({"question": f"{a}+{b}", "answer": f"{a}+{b}={a + b}. #### {a + b}"}) + "\n")
    tok = char_tokenizer()
    from remedi_patches.llada import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(0)
    config = LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=len(tok),
                         embedding_size=len(tok), max_sequence_length=128, rope_theta=10000.0,
                         mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LLaDAModelLM(config).save_pretrained(root / "llada")
    tok.save_pretrained(root / "llada")

    from lit_gpt.config import Config
    from lit_gpt.model import TransEncoder, save_smdm_folder

    torch.manual_seed(0)
    save_smdm_folder(TransEncoder(Config.from_name("Diff_LLaMA_tiny", vocab_size=len(tok), n_embd=32, n_head=2,
                                                   intermediate_size=64, block_size=128)), root / "smdm")
    tok.save_pretrained(root / "smdm")
    return root


def make_cfg(root: Path, out: str, **kw) -> RemaskConfig:
    base = dict(model_name=str(root / "llada"), dataset=str(root / "sums.jsonl"), seq_len=SEQ_LEN, batch_size=4,
                max_steps=6, lr=1e-2, lr_lora=1e-2, eval_samples=16, eval_every=0, save_every=0,
                out_dir=str(root / out), accelerator="cpu", precision="32-true", seed=7)
    base.update(kw)
    return RemaskConfig(**base)


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def csv_rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ups_only_freezes_backbone_and_trains_head(root):
    backbone = load_backbone(root / "llada")
    before = snapshot(backbone.model)
    torch.manual_seed(1)
    start_head = root / "start_head.safetensors"
    save_ups_head(start_head, UPSHead(32, 8), {"mask_id": backbone.mask_id})
    cfg = make_cfg(root, "ups_only", load_ups_head=str(start_head), max_steps=12, eval_every=12)
    out = run(cfg, backbone=backbone)

    after = backbone.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every backbone tensor bit-identical
    assert not any(p.requires_grad for p in backbone.model.parameters())
    start, _ = load_ups_head(start_head)
    head, meta = load_ups_head(out["head_path"])
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), head.state_dict().values()))
    assert (meta["hidden_size"], meta["width"], meta["mask_id"]) == (32, 8, backbone.mask_id)
    assert meta["train_args"]["train_mode"] == "ups_only" and meta["backbone"] == str(root / "llada")
    assert meta["prompt_template"] == "Question: {question}\nAnswer:"  # how the prompts were rendered

    rows = csv_rows(out["metrics_csv"])
    ups = [float(r["ups_loss"]) for r in rows]
    assert len(ups) == 12 and sum(ups[-4:]) < sum(ups[:4])  # the UPS loss falls
    assert all(float(r["tps_update"]) == 0 and float(r["ups_update"]) == 1 for r in rows)
    mask_frac = [float(r["mask_frac"]) for r in rows]
    incorrect_frac = [float(r["incorrect_frac"]) for r in rows]
    assert all(0 <= m <= 1 for m in mask_frac) and 0.2 < sum(mask_frac) / 12 < 0.8  # E[t] = 0.5
    assert all(0 <= i <= 1 for i in incorrect_frac) and sum(incorrect_frac) / 12 < 0.1  # E[4rt(1-t)^2] = r/3
    assert 0 <= out["eval_auc"] <= 1 and out["eval_incorrect_tokens"] > 0

    from generate import generate

    calls = []
    head.register_forward_hook(lambda *args: calls.append(1))
    prompt = torch.tensor([backbone.tokenizer("12+30\n")["input_ids"]])
    x = generate(backbone.model, prompt, steps=4, gen_length=8, block_length=8, mask_id=backbone.mask_id,
                 confidence_source="ups", ups_head=head, eos_id=backbone.eos_id, eot_id=backbone.eot_id)
    assert x.shape == (1, prompt.shape[1] + 8) and torch.equal(x[:, :prompt.shape[1]], prompt)
    assert not (x == backbone.mask_id).any() and len(calls) == 4  # the head ranked every step


@pytest.mark.slow
def test_ups_only_with_tps_incorrect_tokens(root):
    backbone = load_backbone(root / "llada")
    before = snapshot(backbone.model)
    out = run(make_cfg(root, "ups_tps", incorrect_source="tps", max_steps=12), backbone=backbone)
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())  # bit-identical
    rows = csv_rows(out["metrics_csv"])
    ups = [float(r["ups_loss"]) for r in rows]
    assert len(ups) == 12 and sum(ups[-4:]) < sum(ups[:4])  # the UPS loss falls
    _, meta = load_ups_head(out["head_path"])
    assert meta["train_args"]["incorrect_source"] == "tps"
    assert 0 <= out["eval_auc"] <= 1 and out["eval_incorrect_tokens"] > 0

    uniform = run(make_cfg(root, "ups_uniform", max_steps=4), backbone=backbone)
    same = ("mask_frac", "incorrect_frac")  # same seed: same t, masked and incorrect sets, other tokens
    assert [[r[k] for k in same] for r in csv_rows(uniform["metrics_csv"])] == [[r[k] for k in same] for r in rows[:4]]
    assert uniform["eval_incorrect_tokens"] == out["eval_incorrect_tokens"]
    assert uniform["losses"] != out["losses"][:4]


def test_propose_incorrect_uses_the_backbone_without_grad(root):
    backbone = load_backbone(root / "llada")
    model = backbone.model.train()
    model.requires_grad_(True)
    ids = backbone.tokenizer(["3+4\n3+4=7. #### 7"] * 8, return_tensors="pt")["input_ids"]
    answer = torch.arange(ids.shape[1])[None].expand_as(ids) >= 5
    special = [backbone.mask_id, backbone.eos_id]
    noise = apply_remask_noise(ids, answer, backbone.mask_id, 1.0, len(backbone.tokenizer), special, t=0.5,
                               generator=torch.Generator().manual_seed(0))
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append((m.training, torch.is_grad_enabled())))
    tps = propose_incorrect(model, plain_rows(ids, answer), noise, backbone.mask_id, len(backbone.tokenizer), special,
                            torch.Generator().manual_seed(1))
    handle.remove()
    assert calls == [(False, False)] and model.training  # eval mode and no grad for the proposal, then restored
    assert torch.equal(tps.incorrect, noise.incorrect) and torch.equal(tps.masked, noise.masked)
    assert noise.incorrect.sum() > 5 and (tps.noisy[tps.incorrect] != ids[tps.incorrect]).all()
    assert not torch.isin(tps.noisy[tps.incorrect], torch.tensor(special)).any()


@pytest.mark.slow
def test_joint_lora_round_trip_base_unchanged_and_ups_gradient_isolated(root):
    backbone = load_backbone(root / "smdm")  # TransEncoder: hidden state from the final-norm hook, PEFT on lit_gpt
    before = snapshot(backbone.model)
    cfg = make_cfg(root, "joint", model_name=str(root / "smdm"), train_mode="joint", max_steps=4)
    out = run(cfg, backbone=backbone)
    assert (out["tps_updates"], out["ups_updates"]) == (4, 4)

    model = backbone.model
    trained = {k: v for k, v in model.state_dict().items()}
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert base.keys() == before.keys() and all(torch.equal(before[k], base[k]) for k in before)
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: it has trained

    reloaded = load_lora(load_backbone(root / "smdm").model, out["lora_dir"])
    ids = torch.randint(0, 60, (2, SEQ_LEN))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids), reloaded(ids), atol=1e-6)

    # a backward of the UPS loss alone puts no gradient on any LoRA parameter (the TPS loss does)
    head, _ = load_ups_head(out["head_path"])
    ids = backbone.tokenizer(["3+4\n3+4=7. #### 7"] * 2, return_tensors="pt")["input_ids"]
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 5:] = True
    noise = apply_remask_noise(ids, answer, backbone.mask_id, 0.5, len(backbone.tokenizer), [0, 1, 2, 3], t=0.5,
                               generator=torch.Generator().manual_seed(0))
    model.train()
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)
    losses, _ = remask_forward(model, head, noise, plain_rows(ids, answer), "joint", 1.0)
    losses.ups.backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lora_params)
    assert any(p.grad is not None for p in head.parameters())
    losses.tps.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params)


def test_autograd_follows_the_update_kind(root):
    backbone = load_backbone(root / "llada")
    backbone.model.requires_grad_(True)  # even a trainable backbone gets no graph in a UPS update
    head = UPSHead(32)
    ids = backbone.tokenizer(["3+4\n3+4=7. #### 7"], return_tensors="pt")["input_ids"]
    answer = torch.arange(ids.shape[1])[None] >= 5
    noise = apply_remask_noise(ids, answer, backbone.mask_id, 0.5, len(backbone.tokenizer), [0, 1, 2, 3], t=0.5,
                               generator=torch.Generator().manual_seed(0))
    grads = {}
    for kind in ("ups", "tps", "joint", "full", "eval"):
        losses, ups_logits = remask_forward(backbone.model, head, noise, plain_rows(ids, answer), kind, 1.0,
                                            ups_grad_to_backbone=kind == "full")
        grads[kind] = (losses.tps.requires_grad, ups_logits.requires_grad)
    assert grads == {"ups": (False, True), "tps": (True, False), "joint": (True, True), "full": (True, True),
                     "eval": (False, False)}


def test_step_kind_ratio():
    kinds = [step_kind("alternating", s, 3) for s in range(12)]
    assert kinds == ["tps", "tps", "tps", "ups"] * 3
    assert {step_kind("joint", s, 3) for s in range(5)} == {"joint"}
    assert {step_kind("ups_only", s, 3) for s in range(5)} == {"ups"}
    for mode in ("ups_only", "joint", "alternating"):  # the logged running counts follow the step kinds
        for n in range(13):
            kinds = [step_kind(mode, s, 2) for s in range(n)]
            assert update_counts(mode, n, 2) == (sum(k in ("joint", "tps") for k in kinds),
                                                 sum(k in ("joint", "ups") for k in kinds))


@pytest.mark.slow
def test_alternating_updates_lora_then_head(root):
    backbone = load_backbone(root / "llada")
    cfg = make_cfg(root, "alt", train_mode="alternating", alt_ratio=2, max_steps=6, save_every=1,
                   lora_dropout=0.0, eval_samples=0)
    real_save = training.save_checkpoint
    snaps = []

    def save_and_snapshot(fabric, path, state):  # record head and LoRA after every update
        snaps.append((snapshot(state["head"]), snapshot(state["lora"])))
        return real_save(fabric, path, state)

    training.save_checkpoint = save_and_snapshot
    try:
        out = run(cfg, backbone=backbone)
    finally:
        training.save_checkpoint = real_save
    assert (out["tps_updates"], out["ups_updates"]) == (4, 2)
    rows = csv_rows(out["metrics_csv"])
    assert [int(float(r["tps_update"])) for r in rows] == [1, 1, 0, 1, 1, 0]
    for step, ((head, lora), (prev_head, prev_lora)) in enumerate(zip(snaps[1:], snaps[:-1]), start=1):
        head_moved = any(not torch.equal(head[k], prev_head[k]) for k in head)
        lora_moved = any(not torch.equal(lora[k], prev_lora[k]) for k in lora)
        assert (head_moved, lora_moved) == ((False, True) if step % 3 != 2 else (True, False)), step


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ups_only", "joint"])
def test_killed_run_resumes_same_losses(root, mode):
    full = run(make_cfg(root, f"full_{mode}", max_steps=6, train_mode=mode), backbone=load_backbone(root / "llada"))
    cfg = make_cfg(root, f"killed_{mode}", max_steps=6, save_every=3, train_mode=mode)
    killed_after_first_checkpoint(cfg, lambda: load_backbone(root / "llada"))
    resumed = run(cfg, backbone=load_backbone(root / "llada"))
    assert resumed["updates"] == 6 and len(resumed["losses"]) == 3
    assert resumed["losses"] == pytest.approx(full["losses"][3:], abs=1e-6)
    a, _ = load_ups_head(full["head_path"])
    b, _ = load_ups_head(resumed["head_path"])
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    if mode == "joint":  # the checkpoint holds the adapter only, and the resumed adapter equals the uninterrupted one
        ckpt = torch.load(sorted((root / f"killed_{mode}").glob("iter-*-ckpt.pth"))[0], weights_only=True)
        assert len(ckpt["lora"]) == 2 * 7 * 2  # A and B of 7 linear layers in 2 blocks
        from safetensors.torch import load_file

        x = load_file(Path(full["lora_dir"]) / "adapter_model.safetensors")
        y = load_file(Path(resumed["lora_dir"]) / "adapter_model.safetensors")
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(root):
    """2 CPU processes (DDP, gloo) x batch 2 follow 1 process x batch 4: same samples, same noise, same updates."""
    common = ["--model_name", str(root / "llada"), "--dataset", str(root / "sums.jsonl"), "--seq_len", str(SEQ_LEN),
              "--max_steps", "3", "--eval_samples", "16", "--train_mode", "joint", "--lora_dropout", "0",
              "--accelerator", "cpu", "--precision", "32-true", "--seed", "7", "--lr", "1e-2", "--lr_lora", "1e-2"]
    one = train_remedi.main(common + ["--batch_size", "4", "--out_dir", str(root / "ddp1")])
    import subprocess

    proc = subprocess.run([sys.executable, str(REPO / "SMDM" / "pretrain" / "train_remedi.py"), *common,
                           "--batch_size", "2", "--devices", "2", "--strategy", "ddp", "--out_dir", str(root / "ddp2")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [float(r["loss"]) for r in csv_rows(str(root / "ddp2" / "logs" / "version_0" / "metrics.csv"))]
    # per-rank means of the UPS token average differ from the global one by the answer-length mix only
    assert two == pytest.approx(one["losses"], rel=1e-3)
    a, _ = load_ups_head(one["head_path"])
    b, _ = load_ups_head(root / "ddp2" / "ups_head.safetensors")
    assert all(torch.allclose(x, y, atol=1e-3) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_field_error_lists_fields(root):
    cfg = make_cfg(root, "bad", prompt_field="problem")
    with pytest.raises(ValueError, match=r"'problem'.*fields present: \['answer', 'question'\]"):
        run(cfg, backbone=load_backbone(root / "llada"))


def test_cli_help_lists_the_seed_flags(capsys):
    with pytest.raises(SystemExit):
        train_remedi.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model_name", "--dataset", "--split", "--subset", "--text_field", "--prompt_field",
                 "--answer_field", "--seq_len", "--batch_size", "--epochs", "--lr", "--lambda_ups", "--r_incorrect",
                 "--mask_id", "--save_path", "--load_ups_head", "--ups_width", "--grad_accum", "--train_mode",
                 "--alt_ratio", "--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target", "--lr_lora",
                 "--lr_ups", "--save_lora_dir", "--load_lora_dir", "--save_ups_head", "--devices", "--strategy",
                 "--precision", "--num_nodes", "--smdm_size", "--max_steps", "--eval_every", "--out_dir",
                 "--incorrect_source"):
        assert flag in text, flag
    assert "(default: 0.1)" in text  # r_incorrect's default is shown
    flat = " ".join(text.split())
    assert "learning rate of the UPS (head or stream); default 0.003 with the embedded model (the demo's recipe), " \
        "else 0.0001 (0.001 / 2e-06 with --recipe paper) --lr_backbone" in flat  # resolved, not "(default: None)"
    assert "default sequence, block_diffusion with --recipe paper" in flat
    assert "DESIGN.md" not in text  # not in this repository


def test_defaults_are_the_demos_recipe_on_the_embedded_model_and_the_seeds_otherwise(root, tmp_path):
    from remedi_patches.remask_sft import EMBEDDED_RECIPE, GENERAL_DEFAULTS

    embedded = train_remedi.parse_config([])
    assert {k: getattr(embedded, k) for k in EMBEDDED_RECIPE} == EMBEDDED_RECIPE == dict(
        seq_len=72, batch_size=32, max_steps=400, lr=3e-3, warmup_steps=20, ups_width=128, eval_samples=256)
    assert (embedded.eval_every, embedded.save_every) == (100, 100)
    other = train_remedi.parse_config(["--model_name", str(root / "llada")])
    assert {k: getattr(other, k) for k in GENERAL_DEFAULTS} == GENERAL_DEFAULTS == dict(
        seq_len=128, batch_size=8, max_steps=0, lr=1e-4, warmup_steps=0, ups_width=None, eval_samples=64)
    # flags given win; the embedded model on other data keeps its window; a loaded head keeps its width
    given = train_remedi.parse_config(["--seq_len", "40", "--lr", "0.5", "--max_steps", "0"])
    assert (given.seq_len, given.lr, given.max_steps, given.batch_size) == (40, 0.5, 0, 32)
    assert train_remedi.parse_config(["--dataset", str(root / "sums.jsonl")]).seq_len == 128
    head = tmp_path / "h.safetensors"
    save_ups_head(head, UPSHead(32, 8), {"mask_id": 0})
    assert train_remedi.parse_config(["--load_ups_head", str(head)]).ups_width is None
    assert RemaskConfig().check() == embedded  # the dataclass resolves the same way


def test_demo_trains_with_the_embedded_recipe(monkeypatch, tmp_path):
    """The demo's head and a bare train_remedi.py run are trained the same way (one recipe, two entry points)."""
    import demo

    from remedi_patches.remask_sft import EMBEDDED_RECIPE

    seen = []

    def fake_run(cfg):
        seen.append(cfg.check())
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        demo.demo(demo.parse_args(["--out_dir", str(tmp_path)]), tmp_path)
    assert {k: getattr(seen[0], k) for k in EMBEDDED_RECIPE} == EMBEDDED_RECIPE
    assert (seen[0].eval_every, seen[0].save_every) == (100, 100)


@pytest.mark.parametrize("argv, match", [
    (["--train_mode", "lora"], "invalid choice"),
    (["--r_incorrect", "2"], "r_incorrect"),
    (["--batch_size", "0"], "batch_size"),
    (["--prompt_template", "Q: {prompt}"], "prompt_template"),
    (["--incorrect_source", "random"], "incorrect_source"),
])
def test_bad_flags(argv, match, capsys):
    with pytest.raises((ValueError, SystemExit)) as err:
        train_remedi.parse_config(argv)
    assert match in (str(err.value) + capsys.readouterr().err)


def test_context_incorrect_tokens_and_smoothed_labels_train(root):
    """--incorrect_source context with --label_smoothing 0.05 (two parts of the paper's recipe): same t and noise
    sets as uniform with the same seed, a finite falling UPS loss, both recorded with the head."""
    backbone = load_backbone(root / "llada")
    out = run(make_cfg(root, "ups_context", incorrect_source="context", label_smoothing=0.05, max_steps=8),
              backbone=backbone)
    rows = csv_rows(out["metrics_csv"])
    ups = [float(r["ups_loss"]) for r in rows]
    assert len(ups) == 8 and all(math.isfinite(u) for u in ups) and sum(ups[-3:]) < sum(ups[:3])
    _, meta = load_ups_head(out["head_path"])
    assert meta["train_args"]["incorrect_source"] == "context" and meta["train_args"]["label_smoothing"] == 0.05
    uniform = run(make_cfg(root, "ups_uniform_ctx", max_steps=2), backbone=backbone)
    same = ("mask_frac", "incorrect_frac")
    assert [[r[k] for k in same] for r in csv_rows(uniform["metrics_csv"])] == [[r[k] for k in same] for r in rows[:2]]
