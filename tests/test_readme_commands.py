"""Every shell command of README.md that runs on the embedded model is run here, as written, in README order.

The README is the user's manual: a command that drifts from the code must fail CI. The test copies the repository's
tracked files into a temporary folder (so `out/`, `~` and the working folder are the test's own, with `../shared`
beside it), extracts the commands from README.md's code blocks (indented or ```bash / ```sh blocks; `\\` continues
a line) and runs each with bash. Commands are only skipped for a reason stated here:
- it names a model or dataset on the Hugging Face hub (no hub on CI machines; the loaders' hub paths have their
  own tests), or
- it is `make test` (this suite itself).
Long jobs run at tiny sizes through the flags they offer (TINY below); each TINY rule must still match a README
command, so the table cannot silently go stale. A README command with a placeholder (`...`) that is not skipped
fails the test: commands meant for the embedded model must be complete.
"""
from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from remedi_patches.sources import HUB_NAME
from test_pipeline import TINY as PIPELINE_TINY

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHELL_FENCES = ("```bash", "```sh", "```shell", "```console")
COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(python|make|opencompass|bash)\b")
LOCAL_ROOTS = {"out", "checkpoints", "..", ".", "~"}  # first path components that are never hub organisations

# (pattern in a README command, replacement): the same command at a size CI can afford
TINY: list[tuple[str, str]] = [
    (r"^make demo$", "python demo.py --train_steps 40 --n_eval 8 --infer_bs 8"),
    (r"--embedded 50\b", "--embedded 6"),
    (r"--max_samples 50\b", "--max_samples 4"),
    (r"(python -m remedi_patches\.embedded\.build)(?!.*--n_train)",
     r"\1 --n_train 400 --pretrain_steps 4 --sft_steps 4 --batch_size 8"),
    (r"(python SMDM/pretrain/train_remedi\.py --out_dir out/my_head)$", r"\1 --max_steps 20"),
    (r"^(python -m remedi_patches\.embedded\.remedi)$", r"\1 --max_steps 3"),
    (r"(python SMDM/pretrain/train_remedi\.py --model_name embedded --add_ups_stream .*)$", r"\1 --max_steps 3"),
    (r"^(python SMDM/pretrain/train_mdm\.py)$", r"\1 --max_steps 2 --eval_iters 1 --eval_mc 1"),
    (r"^(python SMDM/sft/train_sft\.py --pretrained_path out/train_mdm/final)$", r"\1 --max_steps 2 --limit 500"),
    (r"^(python SMDM/rl/train_rl\.py .*--out_dir out/rl_\w+)$",
     r"\1 --max_steps 2 --prompts_per_step 1 --group_size 2 --steps 4 --eval_samples 4"),
    (r"^(python bench/bench_rl\.py .*)$", r"\1 --n_problems 4 --steps 32"),
    (r"^(python SMDM/sedd/sft\.py sft\.pretrained_model=embedded sft\.dataset=embedded) training\.n_iters=200",
     r"\1 training.n_iters=2 training.batch_size=4 sft.limit=64"),
    (r"^(python bench/bench_sedd_accuracy\.py)$", r"\1 --n_problems 4 --steps 4 --llada_steps 4 --llada_gen_length 8"),
    (r"^(python -m remedi_patches\.sedd\.embedded --work_dir out/embedded_sedd_build)$",
     r"\1 --n_train 200 --pretrain_steps 2 --sft_steps 2 --batch_size 4 --hidden_size 32 --n_blocks 1 --n_heads 2 "
     r"--cond_dim 16"),
    (r"^(python train_pipeline\.py --config configs/embedded\.yaml)$",
     r"\1 " + " ".join(f"--set {shlex.quote(pair)}" for pair in PIPELINE_TINY)),
    (r"^(python bench/sweep\.py --out_dir out/sweep_embedded) --grid .*$",
     r"\1 --grid r_incorrect=0.05,0.2 --base max_steps=2 --base batch_size=4 --base eval_samples=16 "
     r"--base max_records=64 --n_eval 3 --steps 8 4 --gen_length 8 --block_length 8"),
    (r"^(python bench/bench_fast_decoding\.py)$",
     r"\1 --n_problems 4 --batch 2 --repeats 1 --prompt_len 16 --gen_length 32 --embedded_gen_length 32"),
]


@dataclass
class Command:
    text: str   # as README writes it (continuations joined)
    line: int   # README line number of its first line

    @property
    def skip_reason(self) -> Optional[str]:
        if self.text == "make test":
            return "the test suite itself"
        hub = hub_names(self.text)
        if hub:
            return f"needs the hub ({', '.join(hub)})"
        return None


def hub_names(command: str) -> list[str]:
    """Hub repositories `command` needs: tokens of the form org/name whose org is no local folder, also inside the
    config files it runs (an OpenCompass config and the model configs it imports)."""
    tokens = re.split(r"[\s,=\"']+", command)
    found = [t for t in tokens if is_hub(t)]
    for token in tokens:
        if token.endswith(".py") and (REPO / token).is_file() and token.startswith("opencompass_patch/configs/"):
            found += config_hub_names(REPO / token)
    return found


def is_hub(token: str) -> bool:
    root = token.split("/", 1)[0]
    return bool(HUB_NAME.fullmatch(token)) and root not in LOCAL_ROOTS and not (REPO / root).exists()


def config_hub_names(config: Path) -> list[str]:
    """Hub names in an OpenCompass config file and the `from .models.X import` files it reads."""
    text = config.read_text()
    names = re.findall(r"path\s*=\s*[\"']([^\"']+)[\"']", text)
    found = [n for n in names if is_hub(n)]
    for module in re.findall(r"from \.(models\.\w+) import", text):
        found += config_hub_names(config.parent / (module.replace(".", "/") + ".py"))
    return found


def readme_commands(text: str) -> list[Command]:
    """Shell commands of the README's code blocks, in order; comments after `#` are dropped."""
    commands: list[Command] = []
    lines = text.splitlines()
    in_fence = shell_fence = False
    pending: Optional[Command] = None
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_fence, shell_fence = not in_fence, stripped in SHELL_FENCES and not in_fence
            continue
        indented = raw.startswith("    ") and not in_fence
        if not (shell_fence or indented):
            pending = None
            continue
        code = stripped
        if pending is not None:
            pending.text += " " + code.rstrip("\\").strip()
            if not code.endswith("\\"):
                pending = None
            continue
        if not COMMAND_START.match(code):
            continue
        command = Command(strip_comment(code).rstrip("\\").strip(), number)
        commands.append(command)
        if strip_comment(code).endswith("\\"):
            pending = command
    for command in commands:
        command.text = strip_comment(command.text)
    return commands


def strip_comment(code: str) -> str:
    """The command without a trailing `# comment` (a `#` outside quotes that follows whitespace)."""
    quote = None
    for i, ch in enumerate(code):
        if ch in "\"'" and (quote is None or quote == ch):
            quote = None if quote == ch else ch
        elif ch == "#" and quote is None and i > 0 and code[i - 1].isspace():
            return code[:i].rstrip()
    return code.rstrip()


def tiny(command: str, used: set[int]) -> str:
    for index, (pattern, replacement) in enumerate(TINY):
        new = re.sub(pattern, replacement, command)
        if new != command:
            used.add(index)
            command = new
    return command


# ---------------------------------------------------------------- what each command must show

Check = Callable[[str, Path], None]


def wrote(*paths: str) -> Check:
    def check(output: str, root: Path) -> None:
        for pattern in paths:
            assert list(root.glob(pattern)), f"nothing matches {pattern} under the working folder"
    return check


def prints(*needles: str) -> Check:
    def check(output: str, root: Path) -> None:
        for needle in needles:
            assert needle in output, f"{needle!r} not in the output"
    return check


def opencompass_scored(output: str, root: Path) -> None:
    (summary,) = root.glob("out/opencompass/*/summary/summary_*.csv")
    rows = list(csv.DictReader(summary.open()))
    scores = [float(v) for row in rows for k, v in row.items() if k not in ("dataset", "version", "metric", "mode")]
    assert scores and all(0 <= s <= 100 for s in scores), rows


def generated_answer(output: str, root: Path) -> None:
    answer = output.split("### answer", 1)[-1].strip()
    assert "### answer" in output and answer, output[-500:]


CHECKS: list[tuple[str, Check]] = [
    (r"demo\.py", lambda out, root: (prints("tps_prob", "ups", "AUC", "embedded RemeDi", "ups:noremask")(out, root),
                                     wrote("out/demo/ups_head.safetensors")(out, root))),
    (r"train_remedi\.py --out_dir out/my_head", wrote("out/my_head/ups_head.safetensors")),
    (r"train_remedi\.py .*--out_dir out/my_remedi", wrote("out/my_remedi/model/model.safetensors")),
    (r"remedi_patches\.embedded\.build", wrote("out/embedded_build/backbone/model.safetensors")),
    (r"remedi_patches\.embedded\.remedi", wrote("out/embedded_remedi/model.safetensors")),
    (r"train_mdm\.py", wrote("out/train_mdm/final/model.safetensors")),
    (r"train_sft\.py", wrote("out/train_sft/final/model.safetensors")),
    (r"train_rl\.py .*--out_dir out/rl_remask", wrote("out/rl_remask/model/model.safetensors")),
    (r"train_rl\.py .*--out_dir out/rl_diffu", wrote("out/rl_diffu/model/model.safetensors")),
    (r"bench_rl\.py", wrote("out/bench_rl/rewards.png", "out/bench_rl/results.md")),
    # a model trained for a few steps may answer nothing yet: the answer section is enough
    (r"generate\.py --model out/(embedded_build|train_sft|embedded_remedi|my_remedi|rl_remask)", prints("### answer")),
    (r"generate\.py", generated_answer),
    (r"eval_gsm_math\.py --predictions", prints("accuracy")),
    (r"eval_gsm_math\.py", wrote("out/eval_gsm_math/summary.json")),
    (r"infer_compare\.py.*--html", lambda out, root: (prints("=== prompt")(out, root),
                                                            wrote("out/**/*.html")(out, root))),
    (r"infer_compare\.py", prints("=== prompt")),
    (r"remedi_patches\.detection", wrote("out/**/*.png")),
    (r"prepare_data --embedded", wrote("out/compass_data/**/*.jsonl")),
    (r"prepare_data --out", wrote("home/compass_data/data/gsm8k/test.jsonl")),
    (r"^opencompass .*eval_embedded", opencompass_scored),
]


def check_for(command: str) -> Optional[Check]:
    return next((check for pattern, check in CHECKS if re.search(pattern, command)), None)


# ---------------------------------------------------------------- the test


def test_readme_parser_finds_commands_and_skips_only_for_stated_reasons():
    commands = readme_commands(README.read_text())
    texts = [c.text for c in commands]
    assert "make demo" in texts and "make test" in texts
    assert any(t.startswith("python generate.py") for t in texts)
    skipped = [c for c in commands if c.skip_reason]
    assert all(c.skip_reason for c in skipped if "GSAI-ML/" in c.text)
    run = [c for c in commands if not c.skip_reason]
    assert len(run) >= 10, texts  # a parser that finds nothing must not pass
    placeholders = [f"README.md:{c.line}: {c.text}" for c in run if "..." in c.text or re.search(r"\s[A-Z]\b", c.text)]
    assert not placeholders, "complete these embedded-model commands:\n" + "\n".join(placeholders)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, data_dir) -> Path:
    """A copy of the tracked files with ../shared/data beside it and its own HOME."""
    root = tmp_path_factory.mktemp("readme")
    repo = root / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(data_dir)
    (repo / "home").mkdir()
    return repo


@pytest.mark.slow
def test_every_readme_command_for_the_embedded_model_runs(sandbox):
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:.*\n(\t.*\n)*\t\$\(PY\) demo\.py", makefile, re.M), \
        "make demo no longer runs demo.py: update TINY's make demo rule"
    env = dict(os.environ, HOME=str(sandbox / "home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")  # this worker's share
    env.pop("REMEDI_DEBUG", None)
    used: set[int] = set()
    ran, failures = [], []
    for command in readme_commands(README.read_text()):
        if command.skip_reason:
            continue
        text = tiny(command.text, used)
        start = time.perf_counter()
        proc = subprocess.run(["bash", "-c", text], cwd=sandbox, env=env, capture_output=True, text=True,
                              timeout=900)
        output = proc.stdout + proc.stderr
        print(f"{time.perf_counter() - start:6.1f} s  {text}")  # shown with -s or on failure: where CI time goes
        where = f"README.md:{command.line}: {command.text}\n  ran: {text}\n"
        if proc.returncode != 0:
            failures.append(f"{where}  exit {proc.returncode}:\n{output[-2000:]}")
            continue
        check = check_for(text)
        try:
            if check is None:
                assert output.strip(), "printed nothing"
            else:
                check(output, sandbox)
        except AssertionError as err:
            failures.append(f"{where}  {err}\n{output[-1500:]}")
        ran.append(text)
    assert not failures, "\n\n".join(failures)
    stale = [TINY[i][0] for i in range(len(TINY)) if i not in used]
    assert not stale, f"TINY rules that match no README command any more: {stale}"
    assert len(ran) >= 10, ran
