"""SMDM masked-diffusion pretraining: objective maths, packed data, schedule, checkpoints, resume, DDP."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lit_gpt.training as training
from lit_gpt.diffusion import draw_noise, forward_process, mdm_loss, seeded_generator
from lit_gpt.model import load_smdm_folder
from lit_gpt.packed_dataset import PackedDataset, SampleOrder, write_chunk

from trainer_helpers import REPO, VOCAB, make_char_tokenizer, prepare_data, train_mdm, write_pattern_data
from trainer_helpers import mdm_args as run_args

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_pattern_data(tmp_path_factory.mktemp("packed"))


def read_losses(out_dir: Path) -> list[float]:
    rows = []
    for f in sorted((out_dir / "logs").glob("version_*/metrics.csv")):
        with open(f) as fh:
            rows += [r for r in csv.DictReader(fh) if r["loss"]]
    return [float(r["loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


# ------------------------------------------------------------------ objective maths

def test_mdm_loss_equals_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 4, 0], [2, 2, 3]])
    masked = torch.tensor([[True, False, True], [False, True, True]])
    p_mask = torch.tensor([[0.5] * 3, [0.25] * 3])
    total = 0.0
    for b in range(2):
        for i in range(3):
            if masked[b, i]:
                logp = logits[b, i, targets[b, i]] - math.log(sum(math.exp(v) for v in logits[b, i].tolist()))
                total += -logp.item() / p_mask[b, i].item()
    assert mdm_loss(logits, targets, masked, p_mask).item() == pytest.approx(total / 6, rel=1e-6)


def test_forward_process_masks_where_u_below_p_mask():
    ids = torch.arange(12).view(2, 6)
    t = torch.tensor([0.0, 0.5])
    u = torch.tensor([[0.0005, 0.002, 0.9, 0.5, 0.1, 0.0], [0.4, 0.6, 0.49, 0.51, 0.0, 1.0]])
    noisy, masked, p_mask = forward_process(ids, t, u, mask_id=99, eps=1e-3)
    assert torch.allclose(p_mask, torch.tensor([[1e-3] * 6, [0.5 * 0.999 + 1e-3] * 6]))
    assert masked.tolist() == [[True, False, False, False, False, True], [True, False, True, False, True, False]]
    assert torch.equal(noisy, torch.where(masked, 99, ids))
    keep_prompt = torch.arange(6)[None].expand(2, 6) >= 2
    _, masked2, _ = forward_process(ids, t, u, mask_id=99, maskable=keep_prompt)
    assert torch.equal(masked2, masked & keep_prompt)


def test_noise_draws_are_seeded_and_crop_at_the_stated_rate():
    a = draw_noise(seeded_generator(1, 0, 5), 3, 8, 0.5)
    b = draw_noise(seeded_generator(1, 0, 5), 3, 8, 0.5)
    assert torch.equal(a.t, b.t) and torch.equal(a.u, b.u) and a.length == b.length
    assert not torch.equal(a.u, draw_noise(seeded_generator(1, 0, 6), 3, 8, 0.5).u)
    lengths = [draw_noise(seeded_generator(0, 0, s), 1, 8, 0.25).length for s in range(800)]
    crops = [n for n in lengths if n != 8]
    assert 0.15 < len(crops) / 800 < 0.3 and min(lengths) >= 1
    # masked share over many draws follows p_mask
    draw = draw_noise(seeded_generator(0, 0, 0), 2000, 64)
    _, masked, p_mask = forward_process(torch.zeros(2000, 64, dtype=torch.long), draw.t, draw.u, 1)
    assert abs(masked.float().mean().item() - p_mask.mean().item()) < 0.01


def test_cosine_lr_schedule():
    lrs = [training.cosine_lr(s, 10, 100, 2e-4, 2e-5) for s in range(120)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[9] == pytest.approx(2e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(2e-5 + 0.5 * (2e-4 - 2e-5))
    assert lrs[100] == lrs[119] == 2e-5
    assert training.warmup_for(50_000, None) == 500 and training.warmup_for(5_000, None) == 100
    assert training.warmup_for(20, None) == 20 and training.warmup_for(20, 3) == 3
    assert training.warmup_for(20, 200) == 20


def test_strategy_choice():
    from lightning_fabric.strategies import DDPStrategy, FSDPStrategy
    from lit_gpt.model import Block

    fsdp = training.make_strategy("fsdp", devices=8, num_nodes=1, cpu=False)
    assert isinstance(fsdp, FSDPStrategy) and fsdp._state_dict_type == "full"
    assert fsdp._fsdp_kwargs["auto_wrap_policy"]._module_classes == {Block}
    with pytest.raises(ValueError, match="fsdp needs GPUs.*--strategy ddp"):
        training.make_strategy("fsdp", devices=2, num_nodes=1, cpu=True)
    ddp = training.make_strategy("auto", devices=2, num_nodes=1, cpu=True)
    assert isinstance(ddp, DDPStrategy) and ddp._process_group_backend == "gloo"
    assert training.make_strategy("auto", devices=1, num_nodes=1, cpu=True) == "auto"


# ------------------------------------------------------------------ data

def test_packed_files_round_trip_and_order(tmp_path):
    toks = np.arange(100, dtype=np.uint16)
    write_chunk(tmp_path / "a_0000000000.bin", toks[:60])
    write_chunk(tmp_path / "a_0000000001.bin", toks[60:])
    ds = PackedDataset.from_dir(tmp_path, block_size=16)
    assert len(ds) == 3 + 2  # 60 // 16 + 40 // 16; remainders unused
    assert ds[0].tolist() == list(range(16)) and ds[3].tolist() == list(range(60, 76))
    assert ds.batch([4, 1]).shape == (2, 16) and ds[4].dtype == torch.int64
    order = SampleOrder(len(ds), seed=7)
    first, second = order.indices(0, 5), order.indices(5, 5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert SampleOrder(len(ds), seed=7).indices(3, 4) == (first + second)[3:7]
    data = (tmp_path / "a_0000000001.bin").read_bytes()
    (tmp_path / "a_0000000001.bin").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        PackedDataset.from_dir(tmp_path, 16)
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        PackedDataset.from_dir(tmp_path / "none", 16)


def test_prepare_data_packs_documents_with_eos(tmp_path):
    tok = make_char_tokenizer(tmp_path / "tok")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["ab", "c", "1+1=2"]) + "\n")
    (tmp_path / "more.txt").write_text("xy\n\nz\n")
    (tmp_path / "array.json").write_text(json.dumps([{"text": "q"}, {"text": "9 9"}]))
    files = prepare_data.main(["--input", str(tmp_path / "docs.jsonl"), str(tmp_path / "more.txt"),
                               str(tmp_path / "array.json"), "--tokenizer", str(tmp_path / "tok"),
                               "--out_dir", str(tmp_path / "out"), "--chunk_size", "8"])
    ds = PackedDataset(files, block_size=1)
    stream = [int(ds[i]) for i in range(len(ds))]
    expected = []
    for text in ["ab", "c", "1+1=2", "xy", "z", "q", "9 9"]:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert stream == expected and len(files) == math.ceil(len(expected) / 8)
    with pytest.raises(ValueError, match="already holds"):
        prepare_data.main(["--input", str(tmp_path / "more.txt"), "--tokenizer", str(tmp_path / "tok"),
                           "--out_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="docs.jsonl, line 1: field 'body' \\(from --text_field\\) is not in the "
                       "dataset; fields present: \\['text'\\]"):
        prepare_data.main(["--input", str(tmp_path / "docs.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                           "--out_dir", str(tmp_path / "out2"), "--text_field", "body"])


# ------------------------------------------------------------------ trainer

def test_cli_help_and_bad_flags(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_mdm.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate; default 0.001 with no --train_data_dir (the embedded recipe), else 0.0002" in help_text
    with pytest.raises(ValueError, match="exactly one of --model N"):
        train_mdm.main(run_args(data, tmp_path) + ["--model", "170"])
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        train_mdm.main(run_args(data, tmp_path, global_batch_size=3))
    with pytest.raises(ValueError, match="pass --vocab_size"):
        train_mdm.main(run_args(data, tmp_path, vocab_size=10))
    args = train_mdm.parse_args(["--model", "113", "--flops", "10", "--train_data_dir", str(data)])
    config = train_mdm.model_config(args)
    assert train_mdm.resolve_max_steps(args, config) == int(10e18 / (6 * 113_265_408 * 256 * 2048))


def test_training_loss_falls_and_exports(data, tmp_path):
    losses = train_mdm.main(run_args(data, tmp_path, max_steps=60, warmup_steps=4, save_interval=100,
                                     global_batch_size=8, micro_batch_size=4, random_length_prob=0.0,
                                     val_data_dir=data, eval_iters=4, eval_mc=4, eval_interval=5))
    assert len(losses) == 60 and read_losses(tmp_path) == pytest.approx(losses, rel=1e-6)
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:5])
    with open(next((tmp_path / "logs").glob("version_*/metrics.csv"))) as fh:
        val = [float(r["val_loss"]) for r in csv.DictReader(fh) if r["val_loss"]]
    assert len(val) == 12 and val[-1] < 0.85 * val[0]  # same noise draws at every evaluation
    assert [p.name for p in tmp_path.glob("iter-*")] == ["iter-000120-ckpt.pth"]
    model = load_smdm_folder(tmp_path / "final")
    assert model.config.vocab_size == VOCAB and model.config.name == "Diff_LLaMA_tiny"


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return train_mdm.main(run_args(data, out)), out


class Killed(Exception):
    pass


def test_resume_after_kill_reproduces_losses_exactly(data, tmp_path, uninterrupted, monkeypatch):
    full_losses, full_dir = uninterrupted
    real_save = training.save_checkpoint

    def save_then_die(*a, **kw):
        real_save(*a, **kw)
        raise Killed

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_mdm.main(run_args(data, tmp_path))
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert training.latest_checkpoint(tmp_path).name == "iter-000006-ckpt.pth"
    resumed = train_mdm.main(run_args(data, tmp_path))
    assert resumed == full_losses[3:]  # bit-exact
    assert read_losses(tmp_path) == full_losses  # logs of the killed and the resumed run, steps 1..6
    a = torch.load(full_dir / "iter-000012-ckpt.pth", weights_only=True)
    b = torch.load(tmp_path / "iter-000012-ckpt.pth", weights_only=True)
    assert a["step_count"] == b["step_count"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("failure", ["inside_torch_save", "half_written_file"])
def test_interrupted_checkpoint_write_keeps_last_good_one(data, tmp_path, uninterrupted, monkeypatch, failure):
    full_losses, _ = uninterrupted
    calls = {"n": 0}
    if failure == "inside_torch_save":
        real = torch.save

        def flaky_save(obj, f, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 2:  # second checkpoint: die after writing a few bytes
                f.write(b"PK\x03\x04 partial")
                raise OSError("disk full")
            return real(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", flaky_save)
    else:
        from lightning_fabric import Fabric
        real = Fabric.save

        def half_save(self, path, state, *a, **kw):
            calls["n"] += 1
            real(self, path, state, *a, **kw)
            if calls["n"] == 2:
                data_ = Path(path).read_bytes()
                Path(path).write_bytes(data_[: len(data_) // 2])
                raise KeyboardInterrupt
        monkeypatch.setattr(Fabric, "save", half_save)
    with pytest.raises((OSError, KeyboardInterrupt)):
        train_mdm.main(run_args(data, tmp_path))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["iter-000006-ckpt.pth"]
    ckpt = torch.load(tmp_path / "iter-000006-ckpt.pth", weights_only=True)
    assert ckpt["step_count"] == 3
    (tmp_path / "iter-000099-ckpt.pth.tmp").write_bytes(b"junk from a killed save")  # never picked up
    assert training.latest_checkpoint(tmp_path).name == "iter-000006-ckpt.pth"
    resumed = train_mdm.main(run_args(data, tmp_path))
    assert resumed == full_losses[3:]


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(data, tmp_path):
    train_mdm.main(run_args(data, tmp_path, max_steps=3))
    with pytest.raises(ValueError, match="does not fit the model being trained"):
        train_mdm.main(run_args(data, tmp_path, max_steps=6, model_name="Diff_LLaMA_tiny_gqa"))
    ckpt = tmp_path / "iter-000006-ckpt.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated.*Delete it"):
        train_mdm.main(run_args(data, tmp_path, max_steps=6))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(data, tmp_path):
    """devices=2 (gloo) with micro 2 x accum 1 == devices=1 with micro 2 x accum 2, same global batch 4."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = dict(max_steps=4, save_interval=100, val_data_dir=data, eval_iters=1, eval_mc=2)
    one = train_mdm.main(run_args(data, tmp_path / "d1", **common))
    proc = subprocess.run([sys.executable, str(REPO / "SMDM" / "pretrain" / "train_mdm.py"),
                           *run_args(data, tmp_path / "d2", devices=2, strategy="ddp", **common)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_losses(tmp_path / "d2")
    assert len(one) == len(two) == 4
    assert np.allclose(one, two, rtol=1e-5, atol=1e-6), (one, two)
    m1, m2 = load_smdm_folder(tmp_path / "d1" / "final"), load_smdm_folder(tmp_path / "d2" / "final")
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


# ------------------------------------------------------------------ fit: the one loop, with any step function


def test_fit_contract_alternating_groups_accumulation_and_resume(tmp_path):
    """A trainer is a step function plus the groups each step updates (here: a alternates with b, as Remask SFT's
    alternating mode does); fit averages metrics over micro-batches, schedules each group's LR, checkpoints the
    state and a resumed run continues the same trajectory."""
    from lightning_fabric import Fabric

    def setup(out):
        fabric = Fabric(accelerator="cpu", devices=1, loggers=[training.csv_logger(out)])
        torch.manual_seed(0)
        a, b = fabric.setup_module(torch.nn.Linear(3, 1)), fabric.setup_module(torch.nn.Linear(3, 1))
        opt_a = fabric.setup_optimizers(torch.optim.SGD(a.parameters(), lr=0.1))
        opt_b = fabric.setup_optimizers(torch.optim.SGD(b.parameters(), lr=0.1))
        ga = training.TrainGroup(a, opt_a, lr=0.1, name="a")
        gb = training.TrainGroup(b, opt_b, lr=0.05, min_lr=0.01, name="b", flag="--lr_b")
        state = {"a": a, "b": b, "opt_a": opt_a, "opt_b": opt_b, "step_count": 0, "iter_num": 0}
        x = torch.arange(12.0).view(4, 3) / 10

        def step_fn(step, micro):
            loss = ((a(x[micro::2]) + b(x[micro::2]) - 1) ** 2).mean()
            return loss, {"micro_seen": float(micro), "double": 2 * loss.detach()}

        return fabric, state, step_fn, (lambda step: [ga] if step % 2 == 0 else [gb])

    schedule = training.Schedule(max_steps=6, warmup_steps=0, grad_accum=2, save_interval=3)
    fabric, state, step_fn, groups = setup(tmp_path / "full")
    full = training.fit(fabric, state, step_fn, groups, schedule, tmp_path / "full")
    assert len(full.losses) == 6 and state["step_count"] == 6 and state["iter_num"] == 12
    assert full.metrics["micro_seen"] == 0.5 and full.metrics["double"] == pytest.approx(2 * full.losses[-1])
    assert "lr_b" in full.metrics and "lr_a" not in full.metrics  # the last step (5) trains b only
    assert full.metrics["lr_b"] == pytest.approx(training.cosine_lr(5, 0, 6, 0.05, 0.01))

    fabric, state, step_fn, groups = setup(tmp_path / "killed")
    b_before = state["b"].weight.detach().clone()
    snaps, real = [], training.save_checkpoint

    def save_then_die(fabric_, path, state_):
        snaps.append(state_["b"].weight.detach().clone())
        real(fabric_, path, state_)
        raise KeyboardInterrupt

    training.save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            training.fit(fabric, state, step_fn, groups, schedule, tmp_path / "killed")
    finally:
        training.save_checkpoint = real
    assert not torch.equal(snaps[0], b_before)  # step 1 trained b
    fabric, state, step_fn, groups = setup(tmp_path / "killed")
    resumed = training.fit(fabric, state, step_fn, groups, schedule, tmp_path / "killed",
                           resume=training.resume_path(tmp_path / "killed", "auto"))
    assert resumed.losses == full.losses[3:]


# ------------------------------------------------------------------ vocabulary, plan, cost, tokenizer export


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> tuple[Path, Path]:
    """Packed text of the character tokenizer (vocab 50), made by prepare_data.py (so it records its tokenizer)."""
    root = tmp_path_factory.mktemp("chardata")
    make_char_tokenizer(root / "tok")
    (root / "docs.txt").write_text("\n".join(f"{a}+{b}={a + b}" for a in range(20) for b in range(20)) + "\n")
    prepare_data.main(["--input", str(root / "docs.txt"), "--tokenizer", str(root / "tok"),
                       "--out_dir", str(root / "packed"), "--chunk_size", "512"])
    return root / "packed", root / "tok"


def test_data_vocabulary_is_checked_before_training_and_the_export_carries_the_tokenizer(char_data, tmp_path,
                                                                                          capsys):
    from transformers import AutoTokenizer

    packed, tok = char_data
    meta = training.read_packed_meta(packed)
    vocab = len(AutoTokenizer.from_pretrained(tok))
    assert meta["vocab_size"] == vocab and Path(meta["tokenizer"]) == tok.resolve() and meta["documents"] == 400
    # an explicit vocabulary that differs from the data's tokenizer: one line, before anything is written
    with pytest.raises(ValueError, match=f"tokenizer of {vocab} tokens.*vocab_size 32000; fix --vocab_size {vocab}"):
        train_mdm.main(run_args(packed, tmp_path / "a", vocab_size=32000))
    assert not (tmp_path / "a").exists()
    # none given: the data's (not the config's 32000); the plan comes first; the export loads on its own
    args = {k: v for k, v in dict(zip(run_args(packed, tmp_path / "b")[::2], run_args(packed, tmp_path / "b")[1::2]))
            .items() if k != "--vocab_size"}
    train_mdm.main([x for kv in args.items() for x in kv] + ["--max_steps", "2"])
    out = capsys.readouterr().out
    assert f"vocab_size {vocab}: the tokenizer the packed data was made with" in out
    assert out.index(f"vocab {vocab}, 2 steps of 4 x 16 tokens") < out.index("Exported")
    assert "with its tokenizer" in out
    from remedi_patches.backbones import load_backbone

    backbone = load_backbone(tmp_path / "b" / "final")
    assert backbone.mask_id == vocab and len(backbone.tokenizer) == vocab
    assert backbone.tokenizer("1+2=3")["input_ids"] == AutoTokenizer.from_pretrained(tok)("1+2=3")["input_ids"]


def test_data_without_a_record_is_checked_by_its_largest_token(data, tmp_path):
    assert training.read_packed_meta(data) is None and training.packed_max_token(data) == VOCAB - 1
    training.check_data_vocab([data, None], VOCAB, "m", True)
    with pytest.raises(ValueError, match=f"token id {VOCAB - 1} in .* is >= vocab_size {VOCAB - 1} of m"):
        training.check_data_vocab([data], VOCAB - 1, "m", True)


def test_a_run_far_too_big_for_a_cpu_is_warned_about():
    from lit_gpt.config import Config

    tiny = Config.from_name("Diff_LLaMA_tiny")  # the config's 32000-token vocabulary, upstream batch 256 x 2048
    warning = training.heavy_cpu_warning(tiny, 256, 32, 2048, 1000, gflops=50.0)
    assert warning.startswith("Warning: this is a heavy run for a CPU") and "--global_batch_size" in warning
    assert "GB" in warning and "TFLOP" in warning
    embedded = Config.from_name("Diff_LLaMA_embedded", vocab_size=512)  # the embedded build's pretraining
    assert training.heavy_cpu_warning(embedded, 64, 64, 128, 300, gflops=50.0) is None
    assert training.cpu_gflops(0.01) > 0.1


@pytest.mark.slow
def test_upstream_defaults_on_a_cpu_print_the_plan_within_seconds(tmp_path):
    """The run of the issue (Diff_LLaMA_tiny, 256 x 2048 per step, on a CPU), output piped and NOT unbuffered:
    the plan arrives before the first (minutes-long) step; the process is then stopped. (Whether the heavy-run
    warning follows depends on the matmul speed measured here: test_a_run_far_too_big_for_a_cpu_is_warned_about)"""
    import selectors
    import time

    data = write_pattern_data(tmp_path / "packed", n_tokens=8192, chunk=4096)  # blocks of the default 2048
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    cmd = [sys.executable, str(REPO / "SMDM/pretrain/train_mdm.py"), "--model_name", "Diff_LLaMA_tiny",
           "--train_data_dir", str(data), "--max_steps", "1000", "--micro_batch_size", "1", "--accelerator", "cpu",
           "--out_dir", str(tmp_path / "run")]  # micro-batches of 1: the step is slow, its memory small
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines, start = [], time.monotonic()
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() - start < 60 and not any("steps of 256 x 2048 tokens" in x for x in lines):
            if sel.select(timeout=1) and (line := proc.stdout.readline()):
                lines.append(line)
            elif proc.poll() is not None:
                break
        seconds = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    text = "".join(lines)
    assert "Diff_LLaMA_tiny:" in text and "1000 steps of 256 x 2048 tokens" in text, text
    assert seconds < 45, f"the plan came after {seconds:.0f} s"
