"""The embedded RemeDi: the embedded backbone with the paper's dual-stream UPS (DESIGN.md 10), trained by Remask SFT.

    python -m remedi_patches.embedded.remedi             # train it (REMEDI_RECIPE) -> out/embedded_remedi
    python -m remedi_patches.embedded.remedi --install   # ... into the shipped folder: load_backbone("embedded_remedi")
    python -m remedi_patches.embedded.remedi --untrained --out_dir DIR --ups_positions 0 2 4 --ups_init copy

Training runs `SMDM/pretrain/train_remedi.py --model_name embedded --add_ups_stream` with REMEDI_RECIPE (the paper's
Remask SFT: block-diffusion rows, context incorrect tokens, smoothed labels, lambda_ups 0.3, every weight trained)
in <work_dir>/train; a killed build resumes there. The folder gets smdm_config.json (with ups_positions),
model.safetensors, the tokenizer files, task.json, the training log and BUILD.json (commands, seed, timings, last
metrics).

--untrained writes the starting point only: the backbone's weights copied into the main stream (TPS) with the
feedback linears at zero, so its TPS logits equal the backbone's exactly; UPS blocks after main layers 0, 2 and 4 of
the 6 (lit_gpt.dual_stream.default_ups_positions: the official [0, 10, 20, 30] of 32 layers, scaled), copies of the
main block after each (--ups_init copy) or SMDM's random init (--ups_init smdm).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from remedi_patches.backbones import EMBEDDED_DIR, EMBEDDED_REMEDI_DIR
from remedi_patches.cli import ArgumentParser, UserError, run_main
from remedi_patches.embedded.build import REPO, last_row, recipe_flags, run

DEFAULT_OUT = Path("out/embedded_remedi")
TRAIN_REMEDI = "SMDM/pretrain/train_remedi.py"
# flags of train_remedi.py beside --model_name embedded --add_ups_stream (issue 12's BENCHMARKS.md variants)
REMEDI_RECIPE = {"recipe": "paper", "max_steps": 1200, "seed": 0, "eval_samples": 256, "eval_every": 100,
                 "save_every": 100}
PACKAGE_DIR = Path(__file__).resolve().parents[1]
NOT_COPIED = ("model.safetensors", "smdm_config.json", "BUILD.json")  # the model and the backbone's own build record
NOT_COPIED_PATTERN = "train_log_*.csv"  # the backbone's training logs (its BUILD.json is summarised instead)


def build_embedded_remedi(out_dir: str | Path = DEFAULT_OUT, *, backbone_dir: str | Path = EMBEDDED_DIR,
                          ups_positions: Optional[list[int]] = None, ups_init: str = "copy", seed: int = 0,
                          command: Optional[str] = None, allow_package: bool = False) -> Path:
    """Write the dual-stream RemeDi built from the SMDM folder `backbone_dir` (default: the embedded backbone)
    into `out_dir`; returns it. ups_positions None = default_ups_positions(n_layer). `seed` draws the random
    UPS weights (the confidence linear; the UPS blocks too with ups_init "smdm") without touching the caller's RNG.
    `command` is recorded in BUILD.json (the CLI passes its command line). allow_package: may write into the source
    tree (--install)."""
    from lit_gpt.dual_stream import remedi_from_backbone
    from lit_gpt.model import load_smdm_folder, save_smdm_folder

    out_dir, backbone_dir = Path(out_dir), Path(backbone_dir)
    inside = out_dir.resolve().is_relative_to(PACKAGE_DIR) and not allow_package
    if out_dir.resolve() == backbone_dir.resolve() or inside:
        raise UserError(f"--out_dir {out_dir} is inside the source tree ({PACKAGE_DIR}) or is the backbone folder; "
                        f"write the RemeDi elsewhere (default {DEFAULT_OUT})")
    backbone = load_smdm_folder(backbone_dir)
    if backbone.has_ups_stream:
        raise UserError(f"{backbone_dir} already holds a dual-stream RemeDi; pass a single-stream SMDM backbone")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = remedi_from_backbone(backbone, ups_positions, ups_init)
    save_smdm_folder(model, out_dir)
    for f in sorted(backbone_dir.iterdir()):
        if f.is_file() and f.name not in NOT_COPIED and not f.match(NOT_COPIED_PATTERN):
            shutil.copy2(f, out_dir / f.name)
    ups = sum(p.numel() for p in model.ups.parameters())
    backbone_build = backbone_dir / "BUILD.json"
    record = {
        "command": command,
        "backbone": str(backbone_dir),
        "backbone_build": json.loads(backbone_build.read_text()).get("command") if backbone_build.is_file() else None,
        "ups_positions": model.config.ups_positions,
        "ups_init": ups_init,
        "seed": seed,
        "parameters": {"tps": sum(p.numel() for p in model.parameters()) - ups, "ups": ups},
        "trained": False,
    }
    (out_dir / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def train_embedded_remedi(out_dir: Path, work_dir: Path, recipe: dict = REMEDI_RECIPE,
                          command: Optional[str] = None) -> Path:
    """Train the embedded RemeDi with `recipe` (train_remedi.py flags) in <work_dir>/train and write it to
    `out_dir` with its training log and BUILD.json; returns out_dir."""
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    train_dir = work_dir / "train"
    started = work_dir / "recipe.json"  # a killed build resumes only the same recipe
    if started.is_file() and json.loads(started.read_text()) != recipe:
        raise UserError(f"--work_dir {work_dir} holds a build with another recipe ({started.read_text().strip()}); "
                        "pass another --work_dir, or delete that one to start over")
    started.write_text(json.dumps(recipe) + "\n")
    cmd = [sys.executable, TRAIN_REMEDI, "--model_name", "embedded", "--add_ups_stream", *recipe_flags(recipe),
           "--out_dir", train_dir, "--save_model_dir", work_dir / "model", "--accelerator", "cpu"]
    t0 = time.time()
    with (work_dir / "build.log").open("a") as log:
        run(cmd, log)
    seconds = round(time.time() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in (work_dir / "model").iterdir():
        shutil.copy2(f, out_dir / f.name)
    logs = sorted(train_dir.rglob("metrics.csv"), key=lambda f: f.stat().st_mtime)
    shutil.copy2(logs[-1], out_dir / "train_log_remask_sft.csv")
    record = {
        "command": command,
        "train_command": " ".join(str(c) for c in ["python", *cmd[1:]]),
        "backbone_build": json.loads((EMBEDDED_DIR / "BUILD.json").read_text()).get("command"),
        "recipe": recipe,
        "seconds": seconds,
        "last": {key: last_row(train_dir, key) for key in ("tps_loss", "ups_loss", "eval_auc", "eval_tps_auc")},
        "trained": True,
    }
    (out_dir / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def parse_args(argv=None) -> argparse.Namespace:
    from lit_gpt.dual_stream import UPS_INITS

    p = ArgumentParser(description=__doc__)
    p.add_argument("--out_dir", type=Path, default=None,
                   help=f"folder to write (never the source tree); default {DEFAULT_OUT}")
    p.add_argument("--work_dir", type=Path, default=Path("out/embedded_remedi_build"),
                   help="checkpoints and logs of the training run (a killed build resumes there)")
    p.add_argument("--install", action="store_true",
                   help="write into the shipped folder instead, replacing it "
                        f"({EMBEDDED_REMEDI_DIR.relative_to(REPO)})")
    p.add_argument("--max_steps", type=int, default=REMEDI_RECIPE["max_steps"], help="Remask SFT updates")
    p.add_argument("--seed", type=int, default=REMEDI_RECIPE["seed"], help="UPS init, data order and noise")
    p.add_argument("--untrained", action="store_true", help="only add the fresh UPS stream (no training)")
    p.add_argument("--backbone", type=Path, default=EMBEDDED_DIR,
                   help="--untrained: single-stream SMDM folder the TPS is copied from (default: the embedded "
                        "backbone)")
    p.add_argument("--ups_positions", type=int, nargs="+", default=None,
                   help="--untrained: main layers the UPS blocks follow (default: every n_layer // 3 layers from 0, "
                        "before the last: 0 2 4 of 6)")
    p.add_argument("--ups_init", choices=UPS_INITS, default="copy",
                   help="--untrained: UPS block j a copy of main block ups_positions[j] + 1, or SMDM's random init")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    command = ("python -m remedi_patches.embedded.remedi " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if args.install and args.out_dir is not None:
        raise UserError(f"--install writes into {EMBEDDED_REMEDI_DIR}; drop --out_dir {args.out_dir} or --install")
    out = EMBEDDED_REMEDI_DIR if args.install else (args.out_dir or DEFAULT_OUT)
    if not args.install and out.resolve().is_relative_to(PACKAGE_DIR):
        raise UserError(f"--out_dir {out} is inside the source tree; add --install to replace the shipped RemeDi, "
                        f"or write elsewhere (default {DEFAULT_OUT})")
    if args.untrained:
        out = build_embedded_remedi(out, backbone_dir=args.backbone, ups_positions=args.ups_positions,
                                    ups_init=args.ups_init, seed=args.seed, command=command, allow_package=args.install)
        print(f"embedded RemeDi (untrained UPS, TPS = {args.backbone}) written to {out}")
        return out
    recipe = {**REMEDI_RECIPE, "max_steps": args.max_steps, "seed": args.seed}
    out = train_embedded_remedi(out, args.work_dir, recipe, command)
    print(f"embedded RemeDi (Remask SFT, {recipe}) written to {out}")
    return out


if __name__ == "__main__":
    run_main(main)
