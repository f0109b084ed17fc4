"""train_mdm.py and train_sft.py with no flags at all: the embedded recipe (remedi_patches.embedded.build's
PRETRAIN_RECIPE / SFT_RECIPE) on the embedded world; given data or models keep upstream SMDM's defaults."""
import math
import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import REPO, run_cli
from lit_gpt.config import num_non_embedding_params
from remedi_patches.backbones import EMBEDDED_DIR, load_backbone
from remedi_patches.cli import UserError
from remedi_patches.embedded.build import PRETRAIN_RECIPE, SFT_RECIPE, TASK_SIZES
from trainer_helpers import train_mdm, train_sft

pytestmark = pytest.mark.usefixtures("one_thread")

MDM, SFT = "SMDM/pretrain/train_mdm.py", "SMDM/sft/train_sft.py"


def recipe_of(cfg, recipe: dict) -> dict:
    return {name: getattr(cfg, name) for name in recipe}


# ---------------------------------------------------------------- what the defaults resolve to (no model, no data)


def test_no_flags_are_the_embedded_recipe():
    mdm = train_mdm.parse_args([])
    assert recipe_of(mdm, PRETRAIN_RECIPE) == PRETRAIN_RECIPE
    assert mdm.train_data_dir is None and mdm.out_dir == Path("out/train_mdm")
    sft = train_sft.parse_args([])
    assert recipe_of(sft, SFT_RECIPE) == SFT_RECIPE and SFT_RECIPE["limit"] == TASK_SIZES["train"]
    assert sft.pretrained_path == EMBEDDED_DIR and sft.tokenizer == str(EMBEDDED_DIR) and sft.dataset == "embedded"
    assert sft.out_dir == Path("out/train_sft")


def test_given_data_keeps_upstream_defaults_and_given_flags_win(tmp_path):
    upstream = train_mdm.parse_args(["--train_data_dir", str(tmp_path), "--model", "170", "--max_steps", "5"])
    assert recipe_of(upstream, train_mdm.GENERAL_DEFAULTS) == {**train_mdm.GENERAL_DEFAULTS, "max_steps": 5}
    assert (upstream.seq_len, upstream.global_batch_size, upstream.lr, upstream.min_lr, upstream.seed) == \
        (2048, 256, 2e-4, 2e-5, 3407)  # the values before the embedded recipe existed
    mixed = train_mdm.parse_args(["--lr", "3e-3", "--model", "6", "--flops", "0.001"])  # embedded data, own model
    assert (mixed.lr, mixed.model_name, mixed.max_steps, mixed.seq_len) == (3e-3, None, None, 128)
    config = train_mdm.model_config(mixed)
    assert train_mdm.resolve_max_steps(mixed, config) == int(1e15 / (6 * num_non_embedding_params(config) * 64 * 128))

    data = tmp_path / "sft.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    other = train_sft.parse_args(["--dataset", str(data)])  # the shipped backbone on other data: upstream's recipe
    assert recipe_of(other, train_sft.GENERAL_DEFAULTS) == {**train_sft.GENERAL_DEFAULTS, "warmup_steps": 200}
    assert other.pretrained_path == EMBEDDED_DIR and other.tokenizer == str(EMBEDDED_DIR)
    train_sft.model_config(other)
    assert other.seq_len == 128  # rows of the model's window (at most 2048)
    mine = train_sft.parse_args(["--pretrained_path", str(EMBEDDED_DIR), "--seq_len", "64", "--lr", "5e-4"])
    assert (mine.seq_len, mine.lr, mine.max_steps, mine.limit) == (64, 5e-4, 2000, 50000)


def test_help_says_what_each_none_means(capsys):
    for module, needles in ((train_mdm, ["tokens per training sequence; default 128 with no --train_data_dir (the "
                                         "embedded recipe), else 2048",
                                         "optimizer steps; default 300 with no --train_data_dir (the embedded "
                                         "recipe), else --flops decides"]),
                            (train_sft, ["default: the shipped embedded backbone",
                                         "default: the one the --pretrained_path folder ships",
                                         "default 72 on the embedded task (the embedded recipe), else the model's "
                                         "window, at most 2048"])):
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert needle in text
        for flag in ("--seq_len", "--lr", "--max_steps", "--seed", "--micro_batch_size", "--tokenizer"):
            entry = text.split(f" {flag} ", 1)[1].split(" --", 1)[0]
            assert "(default: None)" not in entry, (flag, entry)


def test_a_model_without_a_tokenizer_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="--tokenizer is required: a random-init model has none"):
        train_sft.parse_args(["--model_name", "Diff_LLaMA_tiny"])
    with pytest.raises(UserError, match=f"--tokenizer is required: {tmp_path} ships none"):
        train_sft.parse_args(["--pretrained_path", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="--pretrained_path"):
        train_sft.parse_args(["--pretrained_path", str(tmp_path / "missing")])


# ---------------------------------------------------------------- the commands, as a user types them


def start_and_stop(script: str, cwd: Path, until: str, timeout: float = 240) -> list[tuple[float, str]]:
    """Run `python <script>` with no flags in `cwd` (output piped, not unbuffered), collect (seconds, line) of its
    output (each of tqdm's carriage-return updates is a line) until a line matches `until`, then stop it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "REMEDI_DEBUG")}
    proc = subprocess.Popen([sys.executable, str(REPO / script)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**env, "TOKENIZERS_PARALLELISM": "false"})
    start, output, seen, lines = time.monotonic(), b"", {}, []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() - start < timeout and not any(re.search(until, line) for _, line in lines):
            if not sel.select(timeout=1):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk
            parts = [part.decode(errors="replace") for part in re.split(rb"[\r\n]", output)]
            lines = [(seen.setdefault(i, time.monotonic() - start), part)  # when the line began to arrive
                     for i, part in enumerate(parts) if part.strip()]
    finally:
        proc.kill()
        proc.wait()
    return lines


def first(lines: list[tuple[float, str]], pattern: str) -> tuple[float, str]:
    found = [(s, line) for s, line in lines if re.search(pattern, line)]
    assert found, f"no line matches {pattern!r}:\n" + "\n".join(line for _, line in lines[-30:])
    return found[0]


@pytest.mark.slow
def test_train_mdm_with_no_flags_packs_the_embedded_task_and_trains(tmp_path):
    lines = start_and_stop(MDM, tmp_path, r"\b1/300\b.*loss=")
    seconds, line = lines[0]
    assert line.startswith("No --train_data_dir: the embedded recipe (Diff_LLaMA_embedded, 300 steps of 64 x 128")
    assert seconds < 45, f"the first line came after {seconds:.0f} s"
    first(lines, r"50000 documents, \d+ tokens .* -> \d+ files in out/train_mdm/embedded_data/packed/train")
    first(lines, r"Diff_LLaMA_embedded: .* vocab 512, 300 steps of 64 x 128 tokens")
    first(lines, r"\b1/300\b.*loss=")  # the first step's progress line
    assert (tmp_path / "out/train_mdm/embedded_data/packed/val/val_meta.json").is_file()


@pytest.mark.slow
def test_train_sft_with_no_flags_starts_from_the_shipped_backbone(tmp_path):
    lines = start_and_stop(SFT, tmp_path, r"\b1/2000\b.*loss=")
    seconds, line = lines[0]
    assert line.startswith(f"SFT of {EMBEDDED_DIR} on 'embedded' with the embedded recipe: reading 50000 records")
    assert seconds < 45, f"the first line came after {seconds:.0f} s"
    first(lines, r"Loaded weights from .*backbone")
    first(lines, r"Diff_LLaMA_embedded: 50000 examples .* 2000 steps of 64 x 72 tokens")
    first(lines, r"\b1/2000\b.*loss=")
    assert (tmp_path / "out/train_sft").is_dir()


# ---------------------------------------------------------------- short runs of the recipe: the exports work


def generates(export: Path) -> None:
    result = run_cli(["generate.py", "--model", str(export), "--prompt", "Tom has 3 apples. He buys 4 more. How many "
                      "now?", "--steps", "8", "--gen_length", "16", "--block_length", "16"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "### answer" in result.stdout


@pytest.mark.slow
def test_a_short_pretraining_with_the_embedded_recipe_exports_a_model_that_generates(tmp_path):
    losses = train_mdm.main(["--out_dir", str(tmp_path), "--max_steps", "3", "--eval_iters", "1", "--eval_mc", "1"])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    backbone = load_backbone(tmp_path / "final")
    assert backbone.mask_id == 512 and len(backbone.tokenizer) == 512
    generates(tmp_path / "final")


@pytest.mark.slow
def test_a_short_sft_with_the_embedded_recipe_exports_a_model_that_generates(tmp_path):
    losses = train_sft.main(["--out_dir", str(tmp_path), "--max_steps", "2"])
    assert len(losses) == 2 and all(math.isfinite(x) and x < 1.0 for x in losses)  # the shipped backbone knows it
    backbone = load_backbone(tmp_path / "final")
    assert backbone.mask_id == 512 and len(backbone.tokenizer) == 512
    generates(tmp_path / "final")
