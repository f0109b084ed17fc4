"""Rebuild the embedded backbone from nothing, with the project's own tools only.

    python -m remedi_patches.embedded.build                    # everything under out/embedded_build
    python -m remedi_patches.embedded.build --install          # ... and then replace the shipped backbone

Stages (each is an ordinary command a user could type; all are logged to <work_dir>/build.log):
  1. task data (train / val / test jsonl, GSM8K layout) and the sentencepiece tokenizer
  2. packed pretraining text (SMDM/scripts/prepare_data.py on the question / answer files):
     "Question: ...\\nAnswer: <solution></s>" per problem
  3. SMDM masked-diffusion pretraining           (SMDM/pretrain/train_mdm.py)
  4. diffusion SFT, prompt kept clean            (SMDM/sft/train_sft.py)
  5. export to <work_dir>/backbone (or --out_dir): model.safetensors, smdm_config.json, the tokenizer,
     both runs' metrics.csv and BUILD.json (commands, seed, timings, last losses). Use it with
     `--model <that folder>`. The shipped backbone in the source tree
     (remedi_patches/embedded/assets/backbone) is only replaced with --install.

A killed build resumes: finished stages are skipped and both trainers continue from their newest
checkpoint in <work_dir>.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from remedi_patches.cli import ArgumentParser, UserError, run_main
from remedi_patches.embedded import ASSETS_DIR

REPO = Path(__file__).resolve().parents[2]
BACKBONE_DIR = ASSETS_DIR / "backbone"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", type=Path, default=Path("out/embedded_build"), help="data, checkpoints and logs")
    p.add_argument("--out_dir", type=Path, default=None,
                   help="where the finished backbone is exported (None = <work_dir>/backbone)")
    p.add_argument("--install", action="store_true",
                   help="export into the source tree's shipped backbone folder instead, replacing it "
                   f"({BACKBONE_DIR.relative_to(REPO)})")
    p.add_argument("--seed", type=int, default=0, help="task, tokenizer and both training runs")
    p.add_argument("--n_train", type=int, default=50000, help="training problems")
    p.add_argument("--vocab_size", type=int, default=512, help="tokenizer size (multiple of 64: no padded rows)")
    p.add_argument("--model_name", default="Diff_LLaMA_embedded", help="lit_gpt config name")
    p.add_argument("--pretrain_steps", type=int, default=300, help="train_mdm.py optimizer steps")
    p.add_argument("--sft_steps", type=int, default=2000, help="train_sft.py optimizer steps")
    p.add_argument("--batch_size", type=int, default=64, help="sequences per optimizer step (both stages)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (both stages)")
    p.add_argument("--sft_seq_len", type=int, default=72, help="prompt + solution + EOS padding")
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


def run(cmd: list[str], log) -> None:
    line = " ".join(str(c) for c in cmd)
    print(f"$ {line}", file=log, flush=True)
    print(f"$ {line}", flush=True)
    done = subprocess.run([str(c) for c in cmd], cwd=REPO)
    if done.returncode != 0:  # the stage printed its own error line
        raise UserError(f"stage `{line}` failed with exit status {done.returncode}; see its output above")


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
            packed = w / "packed" / split
            if not packed.is_dir():
                run([py, "SMDM/scripts/prepare_data.py", "--input", data / f"{split}.jsonl", "--tokenizer", tok,
                     "--out_dir", packed, "--prefix", split], log)
        times["data_s"] = round(time.time() - t0, 1)

        t0 = time.time()
        common = ["--lr", args.lr, "--min_lr", args.lr / 10, "--warmup_steps", 50, "--seed", args.seed,
                  "--global_batch_size", args.batch_size, "--micro_batch_size", args.batch_size,
                  "--accelerator", "cpu", "--devices", 1]
        run([py, "SMDM/pretrain/train_mdm.py", "--model_name", args.model_name, "--vocab_size", args.vocab_size,
             "--train_data_dir", w / "packed" / "train", "--val_data_dir", w / "packed" / "val",
             "--seq_len", 128, "--max_steps", args.pretrain_steps, "--eval_interval", 100, "--eval_iters", 4,
             "--eval_mc", 4, "--save_interval", 100, "--out_dir", w / "mdm", *common], log)
        times["pretrain_s"] = round(time.time() - t0, 1)

        t0 = time.time()
        run([py, "SMDM/sft/train_sft.py", "--pretrained_path", w / "mdm" / "final", "--tokenizer", tok,
             "--dataset", data / "train.jsonl", "--seq_len", args.sft_seq_len, "--max_steps", args.sft_steps,
             "--save_interval", 200, "--out_dir", w / "sft", *common], log)
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
