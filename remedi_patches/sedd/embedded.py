"""Build the embedded SEDD: a tiny score-entropy diffusion model trained on the embedded task with the project's own
SEDD trainer only (the SEDD counterpart of `remedi_patches.embedded.build`, which builds the embedded SMDM backbone).

    python -m remedi_patches.sedd.embedded --work_dir out/embedded_sedd_build       # everything under that folder
    python -m remedi_patches.sedd.embedded --install      # ... then replace the shipped one (model name embedded_sedd)

Stages (the trainer stages are `remedi_patches.sedd.sft.main(overrides)`, i.e. `python SMDM/sedd/sft.py <overrides>`):
  1. task data: the train split (`task.make_split`) as <work_dir>/data/train.jsonl (question / answer records) and
     the pretraining text <work_dir>/data/pretrain_train.jsonl, one {"document": "Question: ...\\nAnswer: <solution>"}
     per problem (the documents the SMDM build packs); the shipped embedded tokenizer, copied (never retrained)
  2. a freshly initialised SEDD (MODEL_RECIPE, seeded) saved with `save_sedd` to <work_dir>/init
  3. pretraining: the trainer in whole-text mode (sft.text_field=document: empty prompt, the whole document and its
     EOS padding scored; the default value 'text' would mean auto-detection) from <work_dir>/init (PRETRAIN_RECIPE)
  4. SFT: the same trainer from the pretraining export <work_dir>/pretrain/model on the question / solution records,
     prompt kept clean (SFT_RECIPE)
  5. export to --out_dir (default <work_dir>/sedd; --install: the shipped remedi_patches/embedded/assets/sedd, the
     model name embedded_sedd): the SFT run's EMA weights in the SEDD hub layout with the tokenizer,
     both runs' metrics.csv and BUILD.json (command, args, stage overrides, timings, last losses). It loads with
     `load_sedd` / `load_backbone` (kind 'sedd') and samples with `python SMDM/sedd/sample.py --model <folder>`.

A killed build resumes: finished stages (their export present) are skipped (BUILD.json then records their time as
null), a stage with a checkpoint continues from it (load_dir), a stage that left no checkpoint starts over.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from remedi_patches.cli import ArgumentParser, UserError, run_main

MODEL_RECIPE = {"hidden_size": 128, "n_blocks": 6, "n_heads": 4, "cond_dim": 64, "length": 128, "dropout": 0.0,
                "graph": "absorb", "noise": "loglinear", "name": "embedded"}
N_TRAIN = 50000  # training problems (the SMDM build's task size)
TEXT_FIELD = "document"  # the pretraining jsonl's field: not 'text', so sft.text_field names it (whole-text mode)


@dataclass
class StageRecipe:
    """One trainer stage: its steps, batch, schedule (warmup then cosine to min_lr) and bookkeeping."""
    n_iters: int
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 50
    ema: float = 0.999
    max_length: int = 72  # prompt + solution + EOS padding: the longest document is 68 tokens
    val_fraction: float = 0.01
    eval_freq: int = 100
    snapshot_freq: int = 100


PRETRAIN_RECIPE = StageRecipe(n_iters=300)
SFT_RECIPE = StageRecipe(n_iters=6000, snapshot_freq=500, eval_freq=500)
SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", type=Path, default=Path("out/embedded_sedd_build"),
                   help="data, runs, checkpoints and logs")
    p.add_argument("--out_dir", type=Path, default=None, help="where the finished SEDD goes (None = <work_dir>/sedd)")
    p.add_argument("--install", action="store_true",
                   help="export into the source tree's shipped folder instead, replacing the embedded_sedd model")
    p.add_argument("--seed", type=int, default=SEED, help="task data, initialisation and both training runs")
    p.add_argument("--n_train", type=int, default=N_TRAIN, help="training problems (pretraining and SFT)")
    p.add_argument("--pretrain_steps", type=int, default=PRETRAIN_RECIPE.n_iters, help="pretraining optimizer steps")
    p.add_argument("--sft_steps", type=int, default=SFT_RECIPE.n_iters, help="SFT optimizer steps")
    p.add_argument("--batch_size", type=int, default=PRETRAIN_RECIPE.batch_size,
                   help="sequences per optimizer step (both stages)")
    p.add_argument("--lr", type=float, default=PRETRAIN_RECIPE.lr,
                   help="peak learning rate (both stages; decays to lr / 10)")
    p.add_argument("--accelerator", default="cpu", help="training.accelerator of both stages (cpu | cuda | auto)")
    m = p.add_argument_group("model (MODEL_RECIPE)")
    for key in ("hidden_size", "n_blocks", "n_heads", "cond_dim", "length"):
        m.add_argument(f"--{key}", type=int, default=MODEL_RECIPE[key], help=f"SEDD {key}")
    args = p.parse_args(argv)
    for key in ("n_train", "pretrain_steps", "sft_steps", "batch_size", "hidden_size", "n_blocks", "n_heads",
                "cond_dim"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.hidden_size % args.n_heads or (args.hidden_size // args.n_heads) % 2:
        raise UserError(f"--hidden_size {args.hidden_size} must split into --n_heads {args.n_heads} heads of an "
                        "even size")
    if args.length < SFT_RECIPE.max_length:
        raise UserError(f"--length {args.length} is shorter than the rows ({SFT_RECIPE.max_length} tokens); raise it")
    return args


def export_dir(args: argparse.Namespace) -> Path:
    """<work_dir>/sedd, --out_dir, or the shipped folder with --install (and only with it)."""
    from remedi_patches.backbones import EMBEDDED_SEDD_DIR

    if args.install:
        if args.out_dir is not None and args.out_dir.resolve() != EMBEDDED_SEDD_DIR.resolve():
            raise UserError(f"--install exports into {EMBEDDED_SEDD_DIR}; drop --out_dir {args.out_dir}, or drop "
                            "--install")
        return EMBEDDED_SEDD_DIR
    out = (args.out_dir if args.out_dir is not None else args.work_dir / "sedd").resolve()
    if out == EMBEDDED_SEDD_DIR.resolve():
        raise UserError(f"--out_dir {args.out_dir} is the shipped embedded SEDD in the source tree; add --install to "
                        "replace it on purpose, or export elsewhere")
    return out


def tokenizer_dir() -> Path:
    from remedi_patches.embedded import ASSETS_DIR

    return ASSETS_DIR / "tokenizer"


def write_data(data: Path, n_train: int, seed: int) -> tuple[Path, Path]:
    """train.jsonl (question / answer) and pretrain_train.jsonl (whole documents) of the train split; made once."""
    from remedi_patches.embedded import task

    qa, text = data / "train.jsonl", data / "pretrain_train.jsonl"
    if not (qa.is_file() and text.is_file()):
        problems = task.make_split(n_train, seed, "train")
        data.mkdir(parents=True, exist_ok=True)
        tmp = text.with_name(f"{text.name}.{os.getpid()}.tmp")
        with tmp.open("w") as f:
            for p in problems:
                f.write(json.dumps({TEXT_FIELD: f"{task.format_prompt(p.question)} {p.solution}"}) + "\n")
        os.replace(tmp, text)
        tmp = qa.with_name(f"{qa.name}.{os.getpid()}.tmp")
        task.write_jsonl(tmp, problems)
        os.replace(tmp, qa)
    return qa, text


def init_model(folder: Path, args: argparse.Namespace, tokenizer) -> int:
    """A seeded fresh SEDD of the recipe saved to `folder` (once); returns its parameter count."""
    import torch

    from remedi_patches.sedd import SEDD, SEDDConfig, load_sedd, save_sedd

    if (folder / "config.json").is_file():
        model = load_sedd(folder)
    else:
        config = SEDDConfig(**{**MODEL_RECIPE, **{k: getattr(args, k) for k in
                                                  ("hidden_size", "n_blocks", "n_heads", "cond_dim", "length")}},
                            tokens=len(tokenizer))
        torch.manual_seed(args.seed)
        model = SEDD(config)
        save_sedd(model, folder, tokenizer)
    return sum(p.numel() for p in model.parameters())


def stage_overrides(recipe: StageRecipe, args: argparse.Namespace, model: Path, dataset: Path, out: Path,
                    steps: int, *extra: str) -> list[str]:
    """The trainer's Hydra overrides of one stage."""
    return [f"sft.pretrained_model={model}", f"sft.dataset={dataset}", f"sft.limit={args.n_train}", *extra,
            f"sft.max_length={recipe.max_length}", f"sft.val_fraction={recipe.val_fraction}",
            f"optim.lr={args.lr}", f"optim.min_lr={args.lr * recipe.min_lr / recipe.lr}",
            f"optim.warmup={recipe.warmup}",
            f"training.n_iters={steps}", f"training.batch_size={args.batch_size}", f"training.ema={recipe.ema}",
            f"training.eval_freq={recipe.eval_freq}", f"training.snapshot_freq={recipe.snapshot_freq}",
            f"training.seed={args.seed}", f"training.accelerator={args.accelerator}", f"out_dir={out}"]


def run_stage(name: str, overrides: list[str], log) -> Optional[float]:
    """sft.main(overrides) unless the stage's export exists; continues from its newest checkpoint if any.
    Returns the last training loss of this call (None when skipped)."""
    from lit_gpt.training import latest_checkpoint
    from remedi_patches.sedd import sft

    out = Path(overrides[-1].split("=", 1)[1])
    if (out / sft.EXPORT_DIR / "config.json").is_file():
        print(f"[{name}] done already: {out / sft.EXPORT_DIR}", flush=True)
        return None
    if latest_checkpoint(out) is not None:
        overrides = overrides + [f"load_dir={out}"]
    elif out.exists():  # a run killed before its first checkpoint: start over
        shutil.rmtree(out)
    line = "python SMDM/sedd/sft.py " + " ".join(overrides)
    for f in (log, sys.stdout):
        print(f"$ {line}", file=f, flush=True)
    result = sft.main(overrides)
    return result.losses[-1] if result.losses else None


def newest_metrics(run: Path) -> Optional[Path]:
    files = sorted(run.rglob("metrics.csv"), key=lambda f: f.stat().st_mtime)
    return files[-1] if files else None


def last_loss(run: Path) -> Optional[float]:
    """The last logged training loss of a run (for a stage a resumed build skipped)."""
    metrics = newest_metrics(run)
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("loss")] if metrics is not None else []
    return float(rows[-1]["loss"]) if rows else None


def main(argv=None) -> Path:
    from remedi_patches.backbones import load_tokenizer

    args = parse_args(argv)
    w = args.work_dir.resolve()
    out = export_dir(args)
    w.mkdir(parents=True, exist_ok=True)
    times: dict[str, Optional[float]] = {}
    losses: dict[str, Optional[float]] = {}
    stages: dict[str, list[str]] = {}
    with (w / "build.log").open("a") as log:
        t0 = time.time()
        tok = w / "tokenizer"
        if not (tok / "tokenizer.json").is_file():
            shutil.copytree(tokenizer_dir(), tok, dirs_exist_ok=True)
        tokenizer = load_tokenizer(tok)
        qa, text = write_data(w / "data", args.n_train, args.seed)
        times["data_s"] = round(time.time() - t0, 1)

        t0 = time.time()
        n_params = init_model(w / "init", args, tokenizer)
        print(f"embedded SEDD: {n_params:,} parameters", flush=True)
        times["init_s"] = round(time.time() - t0, 1)

        stages["pretrain"] = stage_overrides(PRETRAIN_RECIPE, args, w / "init", text, w / "pretrain",
                                             args.pretrain_steps, f"sft.text_field={TEXT_FIELD}")
        stages["sft"] = stage_overrides(SFT_RECIPE, args, w / "pretrain" / "model", qa, w / "sft", args.sft_steps,
                                        "sft.question_field=question", "sft.response_field=answer")
        for stage, overrides in stages.items():
            t0 = time.time()
            losses[stage] = run_stage(stage, overrides, log)
            times[f"{stage}_s"] = round(time.time() - t0, 1) if losses[stage] is not None else None

    out.mkdir(parents=True, exist_ok=True)
    for folder in (w / "sft" / "model", tok):  # the EMA weights, then the embedded tokenizer's own files
        for f in folder.iterdir():
            shutil.copy2(f, out / f.name)
    for stage in ("pretrain", "sft"):
        if losses[stage] is None:
            losses[stage] = last_loss(w / stage)
        metrics = newest_metrics(w / stage)
        if metrics is not None:
            shutil.copy2(metrics, out / f"train_log_{stage}.csv")
    record = {
        "command": f"python -m remedi_patches.sedd.embedded {' '.join(argv if argv is not None else sys.argv[1:])}"
                   .strip(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "model": {**MODEL_RECIPE, **{k: getattr(args, k) for k in ("hidden_size", "n_blocks", "n_heads", "cond_dim",
                                                                     "length")}, "tokens": len(tokenizer)},
        "parameters": n_params,
        "recipes": {"pretrain": asdict(PRETRAIN_RECIPE), "sft": asdict(SFT_RECIPE)},
        "stage_overrides": stages,
        "stage_commands": [f"python SMDM/sedd/sft.py {' '.join(o)}" for o in stages.values()],
        "timings": times,
        "last_train_loss": losses,
    }
    (out / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"embedded SEDD written to {out}", flush=True)
    return out


if __name__ == "__main__":
    run_main(main)
