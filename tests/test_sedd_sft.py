"""SEDD SFT (SMDM/sedd/sft.py -> remedi_patches/sedd/sft.py): the guide's command lines, exact resume, the loss with a
clean unscored prompt, field errors, frozen embeddings and the EMA export."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_gpt.packed_dataset import SampleOrder
from lit_gpt.training import latest_checkpoint
from remedi_patches.backbones import EMBEDDED_DIR, load_tokenizer
from remedi_patches.sedd import SEDD, SEDDConfig, load_sedd, save_sedd
from remedi_patches.sedd import sft
from remedi_patches.sedd.graphs import graph_from_config
from remedi_patches.sedd.losses import score_entropy_loss
from remedi_patches.sedd.noise import noise_from_config

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "SMDM" / "sedd" / "sft.py"
LENGTH = 24


def _model_dir(folder: Path, dropout: float) -> Path:
    tokenizer = load_tokenizer(EMBEDDED_DIR)
    config = SEDDConfig(hidden_size=32, n_heads=4, n_blocks=2, cond_dim=16, length=LENGTH, dropout=dropout,
                        tokens=len(tokenizer), name="tiny")
    torch.manual_seed(0)
    model = SEDD(config)
    with torch.no_grad():  # every parameter random (adaLN-Zero would make the blocks identities)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
    return save_sedd(model, folder, tokenizer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("sedd") / "tiny", dropout=0.1)


@pytest.fixture(scope="module")
def model_dir_nodrop(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("sedd") / "tiny0", dropout=0.0)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> Path:
    rows = [{"question": f"{a}+{b}", "solution": str(a + b), "gemini_thinking_trajectory": f"add {a} {b}",
             "gemini_attempt": str(a + b)} for a in range(1, 5) for b in range(1, 5)]
    return _jsonl(tmp_path_factory.mktemp("data") / "s1k.jsonl", rows)


def tiny(model_dir: Path, data: Path, out_dir: Path, *extra: str) -> list[str]:
    return [f"sft.pretrained_model={model_dir}", f"sft.dataset={data}", f"sft.max_length={LENGTH}",
            "training.n_iters=2", "training.batch_size=2", "training.eval_freq=1", "training.snapshot_freq=2",
            "training.accelerator=cpu", "optim.warmup=2", "optim.lr=1e-3", f"out_dir={out_dir}", *extra]


def _ckpt(out_dir: Path) -> dict:
    return torch.load(latest_checkpoint(out_dir), map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- the guide's command lines


QUICK_START = ["sft.pretrained_model=louaaron/sedd-small", "sft.dataset=simplescaling/s1K-1.1"]
CUSTOM = ["sft.pretrained_model=louaaron/sedd-medium", "sft.dataset=simplescaling/s1K-1.1",
          "sft.question_field=question", "sft.response_field=solution", "sft.freeze_embeddings=True",
          "optim.lr=5e-6", "training.batch_size=32", "training.n_iters=100000"]


def test_guide_command_lines_compose_with_the_guides_defaults():
    cfg = sft.compose_config(QUICK_START)
    assert (cfg.sft.pretrained_model, cfg.sft.dataset, cfg.sft.text_field) == \
        ("louaaron/sedd-small", "simplescaling/s1K-1.1", "text")
    s = sft.settings(cfg)
    assert (s.lr, s.warmup, s.n_iters, s.batch_size, s.accum, s.ngpus, s.freeze_embeddings) == \
        (1e-5, 500, 50000, 64, 1, 1, False)
    assert (s.beta1, s.beta2, s.adam_eps, s.weight_decay, s.grad_clip, s.ema, s.min_lr) == \
        (0.9, 0.999, 1e-8, 0.0, 1.0, 0.9999, 1e-5)
    assert s.max_length is None and s.resume is None
    c = sft.settings(sft.compose_config(CUSTOM))
    assert (c.pretrained_model, c.question_field, c.response_field, c.freeze_embeddings, c.lr, c.batch_size,
            c.n_iters) == ("louaaron/sedd-medium", "question", "solution", True, 5e-6, 32, 100000)
    for option in (["sft.question_field=question", "sft.thinking_field=gemini_thinking_trajectory",
                    "sft.attempt_field=gemini_attempt"], ["ngpus=4"]):
        sft.compose_config(QUICK_START + option)


def test_guide_command_lines_run(qa_data, tmp_path):
    """Quick Start (auto-detection: question + solution) and the custom configuration on the embedded SEDD
    (sft.pretrained_model=embedded) and a local stand-in for the dataset."""
    out = tmp_path / "quick"
    result = sft.main(tiny("embedded", qa_data, out))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert "val_loss" in result.evaluation and (out / "model" / "config.json").is_file()
    assert (out / sft.OVERRIDES_FILE).is_file() and (out / sft.CONFIG_FILE).is_file()
    custom = [o for o in CUSTOM if not o.startswith(("sft.pretrained_model", "sft.dataset", "training."))]
    result = sft.main(tiny("embedded", qa_data, tmp_path / "custom", *custom))
    assert len(result.losses) == 2
    assert load_sedd(tmp_path / "custom" / "model").config.name == "embedded"


# ---------------------------------------------------------------- fields


def _fields(data: Path, *extra: str):
    s = sft.settings(sft.compose_config([f"sft.dataset={data}", *extra]))
    from remedi_patches.data import column_names, load_records

    return sft.resolve_sft_fields(column_names(load_records(str(data))), s)


def test_field_modes(qa_data, tmp_path):
    auto = _fields(qa_data)
    assert (auto.kind, auto.prompt, auto.answer) == ("pair", "question", "solution")
    think = _fields(qa_data, "sft.question_field=question", "sft.thinking_field=gemini_thinking_trajectory",
                    "sft.attempt_field=gemini_attempt")
    assert (think.thinking, think.attempt) == ("gemini_thinking_trajectory", "gemini_attempt")
    from remedi_patches.data import load_records, prompts_and_answers

    _, answers = prompts_and_answers(load_records(str(qa_data)), think)
    assert answers[0] == "Thinking: add 1 1\n\nAttempt: 2"
    text = _jsonl(tmp_path / "text.jsonl", [{"content": "hello world"}, {"content": "more text"}])
    spec = _fields(text, "sft.text_field=content")
    assert (spec.kind, spec.text) == ("text", "content")
    plain = _jsonl(tmp_path / "plain.jsonl", [{"text": "hello"}])
    assert _fields(plain).kind == "text"


def test_missing_field_is_one_error_line(model_dir, qa_data, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), *tiny(model_dir, qa_data, tmp_path / "o"),
                          "sft.question_field=question", "sft.response_field=nope"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'nope'" in lines[0], run.stderr
    assert "sft.response_field" in lines[0] and "question" in lines[0]
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.glob("*.log"))


@pytest.mark.parametrize("bad, words", [
    (["sft.no_such_key=1"], "no_such_key"),
    (["training.n_iters=0"], "training.n_iters must be >= 1"),
    (["training.batch_size=3", "training.accum=2"], "multiple of training.accum"),
    (["sft.pretrained_model=embedded_remedi"], "not a SEDD"),
])
def test_bad_input_is_one_error_line(bad, words, model_dir, qa_data, tmp_path, capsys):
    from remedi_patches.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(sft.main, tiny(model_dir, qa_data, tmp_path / "o", *bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_missing_model_and_dataset(model_dir, qa_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        sft.main(tiny(model_dir, tmp_path / "nothing.jsonl", tmp_path / "o"))
    with pytest.raises(FileNotFoundError):
        sft.main(tiny(tmp_path / "no_model", qa_data, tmp_path / "o2"))


# ---------------------------------------------------------------- the loss


def test_step_loss_is_score_entropy_with_a_clean_unscored_prompt(model_dir_nodrop, qa_data, tmp_path):
    args = tiny(model_dir_nodrop, qa_data, tmp_path / "o", "training.n_iters=1", "sft.val_fraction=0")
    result = sft.main(args)
    s = sft.settings(sft.compose_config(args))
    model = load_sedd(model_dir_nodrop).train()
    tokenizer = load_tokenizer(model_dir_nodrop)
    data = sft.load_data(s, tokenizer, LENGTH)
    assert data.val is None
    x0, mask = sft.batch_of(data.train, SampleOrder(len(data.train), s.seed).indices(0, 2), "cpu")
    assert mask.any() and (~mask).any()
    upstream = model.config.to_upstream_dict()
    graph, noise = graph_from_config(upstream, model.config.tokens), noise_from_config(upstream)
    seen = []

    def score_fn(x, sigma):
        seen.append(x)
        return model(x, sigma)

    with torch.no_grad():
        direct = score_entropy_loss(score_fn, graph, noise, x0, prompt_mask=mask, eps=s.eps,
                                    generator=sft.noise_generator("cpu", s.seed, sft.STREAM_TRAIN, 0, 0)).loss
    assert result.losses[0] == pytest.approx(float(direct), rel=1e-5)
    assert torch.equal(seen[0][mask], x0[mask])  # the prompt is never perturbed

    def prompt_scrambled(x, sigma):  # a different score on the prompt positions: the loss does not see it
        out = model(x, sigma)
        return torch.where(mask[..., None], torch.randn_like(out) * 5, out)

    with torch.no_grad():
        again = score_entropy_loss(prompt_scrambled, graph, noise, x0, prompt_mask=mask, eps=s.eps,
                                   generator=sft.noise_generator("cpu", s.seed, sft.STREAM_TRAIN, 0, 0)).loss
    assert float(again) == pytest.approx(float(direct), rel=1e-6)


# ---------------------------------------------------------------- resume, freezing, EMA export


def test_resume_from_load_dir_continues_the_same_trajectory(model_dir, qa_data, tmp_path):
    whole = tmp_path / "whole"
    sft.main(tiny(model_dir, qa_data, whole, "training.n_iters=4", "training.accum=2"))
    half = tmp_path / "half"
    sft.main(tiny(model_dir, qa_data, half, "training.n_iters=2", "training.accum=2"))
    sft.main([f"load_dir={half}", "training.n_iters=4"])  # the saved run's overrides + this one
    a, b = _ckpt(whole), _ckpt(half)
    assert a["step_count"] == b["step_count"] == 4 and a["ema"]["num_updates"] == b["ema"]["num_updates"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)


def test_freeze_embeddings_and_ema_export(model_dir, qa_data, tmp_path):
    out = tmp_path / "o"
    sft.main(tiny(model_dir, qa_data, out, "sft.freeze_embeddings=True", "training.n_iters=3"))
    before = load_sedd(model_dir).state_dict()
    ckpt = _ckpt(out)
    assert torch.equal(ckpt["model"]["vocab_embed.embedding"], before["vocab_embed.embedding"])
    assert not torch.equal(ckpt["model"]["output_layer.linear.weight"], before["output_layer.linear.weight"])
    exported = load_sedd(out / "model")
    names = [n for n, _ in exported.named_parameters()]
    shadow = dict(zip(names, ckpt["ema"]["shadow_params"]))
    for n, p in exported.named_parameters():
        assert torch.equal(p, shadow[n].float()), n
    moved = [n for n in names if not torch.equal(shadow[n], ckpt["model"][n])]
    assert moved, "the EMA equals the raw weights: the export would not show it holds the EMA"
    assert torch.equal(exported.vocab_embed.embedding, before["vocab_embed.embedding"])
    assert len(load_tokenizer(out / "model")) == exported.config.tokens
