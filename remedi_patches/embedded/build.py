"""Rebuild the embedded backbone from nothing, with the project's own tools only.

    python -m remedi_patches.embedded.build                    # everything under out/embedded_build
    python -m remedi_patches.embedded.build --install          # ... and then replace the shipped backbone

Stages (each is an ordinary command a user could type; all are logged to <work_dir>/build.log):
  1. task data (train / val / test jsonl, GSM8K layout) and the sentencepiece tokenizer
  2. packed pretraining text (SMDM/scripts/prepare_data.py on the question / answer files):
     "Question: ...\\nAnswer: <solution></s>" per problem
  3. SMDM masked-diffusion pretraining           (SMDM/pretrain/train_mdm.py, PRETRAIN_RECIPE)
  4. diffusion SFT, prompt kept clean            (SMDM/sft/train_sft.py, SFT_RECIPE)
  5. export to <work_dir>/backbone (or --out_dir): model.safetensors, smdm_config.json, the tokenizer,
     both runs' metrics.csv and BUILD.json (commands, seed, timings, last losses). Use it with
     `--model <that folder>`. The shipped backbone in the source tree
     (remedi_patches/embedded/assets/backbone) is only replaced with --install.

A killed build resumes: finished stages are skipped and both trainers continue from their newest
checkpoint in <work_dir>.

The two recipes are also the trainers' defaults on the embedded world: `python SMDM/pretrain/train_mdm.py` with no
--train_data_dir runs PRETRAIN_RECIPE on the task packed as in stages 1-2 (`task_data`, with the shipped
tokenizer), and `python SMDM/sft/train_sft.py` with no model runs SFT_RECIPE from the shipped backbone.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

from lit_gpt.training import PACKED_META_SUFFIX
from remedi_patches.cli import ArgumentParser, UserError, run_main
from remedi_patches.embedded import ASSETS_DIR, task

REPO = Path(__file__).resolve().parents[2]
BACKBONE_DIR = ASSETS_DIR / "backbone"
PREPARE_DATA = "SMDM/scripts/prepare_data.py"
TASK_SIZES = {"train": 50000, "val": 500}  # problems per split of the task data (task.py's CLI defaults)
# the embedded recipe: the build's two training stages, and the defaults of train_mdm.py / train_sft.py on the
# embedded world (given flags win); the learning rate decays to min_lr = lr / 10
PRETRAIN_RECIPE = {"model_name": "Diff_LLaMA_embedded", "seq_len": 128, "max_steps": 300, "global_batch_size": 64,
                   "micro_batch_size": 64, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 50, "seed": 0,
                   "eval_interval": 100, "eval_iters": 4, "eval_mc": 4, "save_interval": 100}
SFT_RECIPE = {"seq_len": 72, "max_steps": 2000, "global_batch_size": 64, "micro_batch_size": 64, "lr": 1e-3,
              "min_lr": 1e-4, "warmup_steps": 50, "seed": 0, "save_interval": 200, "limit": TASK_SIZES["train"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", type=Path, default=Path("out/embedded_build"), help="data, checkpoints and logs")
    p.add_argument("--out_dir", type=Path, default=None,
                   help="where the finished backbone is exported (None = <work_dir>/backbone)")
    p.add_argument("--install", action="store_true",
                   help="export into the source tree's shipped backbone folder instead, replacing it "
                   f"({BACKBONE_DIR.relative_to(REPO)})")
    p.add_argument("--seed", type=int, default=PRETRAIN_RECIPE["seed"], help="task, tokenizer and both training runs")
    p.add_argument("--n_train", type=int, default=TASK_SIZES["train"], help="training problems")
    p.add_argument("--vocab_size", type=int, default=512, help="tokenizer size (multiple of 64: no padded rows)")
    p.add_argument("--model_name", default=PRETRAIN_RECIPE["model_name"], help="lit_gpt config name")
    p.add_argument("--pretrain_steps", type=int, default=PRETRAIN_RECIPE["max_steps"],
                   help="train_mdm.py optimizer steps")
    p.add_argument("--sft_steps", type=int, default=SFT_RECIPE["max_steps"], help="train_sft.py optimizer steps")
    p.add_argument("--batch_size", type=int, default=PRETRAIN_RECIPE["global_batch_size"],
                   help="sequences per optimizer step (both stages)")
    p.add_argument("--lr", type=float, default=PRETRAIN_RECIPE["lr"], help="peak learning rate (both stages)")
    p.add_argument("--sft_seq_len", type=int, default=SFT_RECIPE["seq_len"], help="prompt + solution + EOS padding")
    return p.parse_args(argv)


def export_dir(args: argparse.Namespace) -> Path:
    """Where the finished backbone goes: <work_dir>/backbone by default, --out_dir if given, the shipped
    backbone folder only with --install (an --out_dir pointing there without --install is refused)."""
    if args.install:
        if args.out_dir is not None and args.out_dir.resolve() != BACKBONE_DIR.resolve():
            raise UserError(f"--install exports into {BACKBONE_DIR}; drop --out_dir {args.out_dir}, or drop --install")
        return BACKBONE_DIR
    out = args.out_dir if args.out_dir is not None else args.work_dir / "backbone"
    if out.resolve() == BACKBONE_DIR.resolve():
        raise UserError(f"--out_dir {args.out_dir} is the shipped backbone in the source tree; add --install to "
                        "replace it on purpose, or export elsewhere")
    return out


def show(cmd: list, log: Optional[TextIO]) -> str:
    """Print a stage's command (and write it to the build log)."""
    line = " ".join(str(c) for c in cmd)
    for out in (log, sys.stdout) if log is not None else (sys.stdout,):
        print(f"$ {line}", file=out, flush=True)
    return line


def run(cmd: list, log: Optional[TextIO]) -> None:
    line = show(cmd, log)
    done = subprocess.run([str(c) for c in cmd], cwd=REPO)
    if done.returncode != 0:  # the stage printed its own error line
        raise UserError(f"stage `{line}` failed with exit status {done.returncode}; see its output above")


def recipe_flags(recipe: dict, **changes) -> list:
    """A recipe as trainer flags, with `changes` applied."""
    return [x for name, value in {**recipe, **changes}.items() for x in (f"--{name}", value)]


def pack_split(jsonl: Path, tokenizer: Path, packed: Path, log: Optional[TextIO] = None) -> Path:
    """prepare_data.py on a question / answer file into the folder `packed` (file prefix: the file's stem), in this
    process; skipped when a finished packing (its record) is there, redone over one a killed run left half-written."""
    if not (packed / f"{jsonl.stem}{PACKED_META_SUFFIX}").is_file():
        shutil.rmtree(packed, ignore_errors=True)
        argv = [str(a) for a in ("--input", jsonl, "--tokenizer", tokenizer, "--out_dir", packed, "--prefix",
                                 jsonl.stem)]
        show(["python", PREPARE_DATA, *argv], log)
        prepare_data_script().main(argv)
    return packed


def prepare_data_script():
    """SMDM/scripts/prepare_data.py (a script in no package) imported as the module `prepare_data`, once."""
    path = str(REPO / PREPARE_DATA)
    module = sys.modules.get("prepare_data")
    if getattr(module, "__file__", None) != path:
        spec = importlib.util.spec_from_file_location("prepare_data", path)
        module = sys.modules["prepare_data"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def task_data(folder: Path, split: str, tokenizer: Path, seed: int) -> Path:
    """TASK_SIZES[split] problems of the task's `split` (remedi_patches.data.load_records("embedded") gives the same
    ones for seed 0) as <folder>/data/<split>.jsonl, packed by `pack_split` into <folder>/packed/<split>; made once."""
    jsonl = folder / "data" / f"{split}.jsonl"
    if not jsonl.is_file():
        tmp = jsonl.with_name(f"{jsonl.name}.{os.getpid()}.tmp")
        task.write_jsonl(tmp, task.make_split(TASK_SIZES[split], seed, split))
        os.replace(tmp, jsonl)
    return pack_split(jsonl, tokenizer, folder / "packed" / split)


def last_row(metrics_dir: Path, key: str) -> float | None:
    """The last logged value of `key` in the newest metrics.csv under `metrics_dir`."""
    files = sorted(metrics_dir.rglob("metrics.csv"), key=lambda f: f.stat().st_mtime)
    if not files:
        return None
    rows = [r for r in csv.DictReader(files[-1].open()) if r.get(key)]
    return float(rows[-1][key]) if rows else None


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = export_dir(args)  # checked before hours of training
    w = args.work_dir.resolve()
    w.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    times: dict[str, float] = {}
    with (w / "build.log").open("a") as log:
        data, tok = w / "data", w / "tokenizer"
        t0 = time.time()
        if not (data / "test.jsonl").is_file():
            run([py, "-m", "remedi_patches.embedded.task", "--out_dir", data, "--tokenizer_dir", tok,
                 "--n_train", args.n_train, "--seed", args.seed, "--vocab_size", args.vocab_size], log)
        for split in ("train", "val"):  # documents: the prompt rule's "Question: ...\nAnswer:" + " " + solution
            pack_split(data / f"{split}.jsonl", tok, w / "packed" / split, log)
        times["data_s"] = round(time.time() - t0, 1)

        t0 = time.time()
        common = dict(lr=args.lr, min_lr=args.lr / 10, seed=args.seed, global_batch_size=args.batch_size,
                      micro_batch_size=args.batch_size)
        run([py, "SMDM/pretrain/train_mdm.py", *recipe_flags(PRETRAIN_RECIPE, model_name=args.model_name,
                                                              max_steps=args.pretrain_steps, **common),
             "--vocab_size", args.vocab_size, "--train_data_dir", w / "packed" / "train",
             "--val_data_dir", w / "packed" / "val", "--out_dir", w / "mdm", "--accelerator", "cpu"], log)
        times["pretrain_s"] = round(time.time() - t0, 1)

        t0 = time.time()
        run([py, "SMDM/sft/train_sft.py", *recipe_flags(SFT_RECIPE, seq_len=args.sft_seq_len,
                                                         max_steps=args.sft_steps, limit=args.n_train, **common),
             "--pretrained_path", w / "mdm" / "final", "--tokenizer", tok, "--dataset", data / "train.jsonl",
             "--out_dir", w / "sft", "--accelerator", "cpu"], log)
        times["sft_s"] = round(time.time() - t0, 1)

    out.mkdir(parents=True, exist_ok=True)
    for f in (w / "sft" / "final").iterdir():
        shutil.copy2(f, out / f.name)
    for f in tok.iterdir():
        shutil.copy2(f, out / f.name)
    for stage in ("mdm", "sft"):
        logs = sorted((w / stage).rglob("metrics.csv"), key=lambda f: f.stat().st_mtime)
        shutil.copy2(logs[-1], out / f"train_log_{stage}.csv")
    record = {
        "command": f"python -m remedi_patches.embedded.build {' '.join(argv or sys.argv[1:])}".strip(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "stage_commands": (w / "build.log").read_text().splitlines()[-5:],
        "timings": times,
        "last_train_loss": {"mdm": last_row(w / "mdm", "loss"), "sft": last_row(w / "sft", "loss")},
    }
    (out / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"embedded backbone written to {out}")
    return out


if __name__ == "__main__":
    run_main(main)
