"""The embedded RemeDi: the embedded backbone with the paper's dual-stream UPS added (DESIGN.md 10), untrained.

    python -m remedi_patches.embedded.remedi                                  # -> out/embedded_remedi
    python -m remedi_patches.embedded.remedi --out_dir DIR --ups_positions 0 2 4 --ups_init copy

The main stream (TPS) is the backbone's: its weights are copied and the feedback linears start at zero, so the TPS
logits equal the backbone's exactly until the model is trained (Remask SFT). UPS blocks follow main layers
0, 2 and 4 of the 6 by default (lit_gpt.dual_stream.default_ups_positions: the official [0, 10, 20, 30] of 32
layers, scaled) and start as copies of the main block after each (--ups_init copy), or SMDM's random init
(--ups_init smdm). The folder holds smdm_config.json (with ups_positions), model.safetensors, the backbone's
tokenizer files and task.json, and BUILD.json; `load_backbone(<folder>)` and `generate.py --model <folder>` load it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from remedi_patches.backbones import EMBEDDED_DIR
from remedi_patches.cli import ArgumentParser, UserError, run_main

DEFAULT_OUT = Path("out/embedded_remedi")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
NOT_COPIED = ("model.safetensors", "smdm_config.json", "BUILD.json")  # the model and the backbone's own build record
NOT_COPIED_PATTERN = "train_log_*.csv"  # the backbone's training logs (its BUILD.json is summarised instead)


def build_embedded_remedi(out_dir: str | Path = DEFAULT_OUT, *, backbone_dir: str | Path = EMBEDDED_DIR,
                          ups_positions: Optional[list[int]] = None, ups_init: str = "copy", seed: int = 0,
                          command: Optional[str] = None) -> Path:
    """Write the dual-stream RemeDi built from the SMDM folder `backbone_dir` (default: the embedded backbone)
    into `out_dir`; returns it. ups_positions None = default_ups_positions(n_layer). `seed` draws the random
    UPS weights (the confidence linear; the UPS blocks too with ups_init "smdm") without touching the caller's RNG.
    `command` is recorded in BUILD.json (the CLI passes its command line)."""
    from lit_gpt.dual_stream import remedi_from_backbone
    from lit_gpt.model import load_smdm_folder, save_smdm_folder

    out_dir, backbone_dir = Path(out_dir), Path(backbone_dir)
    if out_dir.resolve() == backbone_dir.resolve() or out_dir.resolve().is_relative_to(PACKAGE_DIR):
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


def parse_args(argv=None) -> argparse.Namespace:
    from lit_gpt.dual_stream import UPS_INITS

    p = ArgumentParser(description=__doc__)
    p.add_argument("--out_dir", type=Path, default=DEFAULT_OUT, help="folder to write (never the source tree)")
    p.add_argument("--backbone", type=Path, default=EMBEDDED_DIR,
                   help="single-stream SMDM folder the TPS is copied from (default: the embedded backbone)")
    p.add_argument("--ups_positions", type=int, nargs="+", default=None,
                   help="main layers the UPS blocks follow (default: every n_layer // 3 layers from 0, before the "
                        "last: 0 2 4 of 6)")
    p.add_argument("--ups_init", choices=UPS_INITS, default="copy",
                   help="UPS block j: a copy of main block ups_positions[j] + 1, or SMDM's random init")
    p.add_argument("--seed", type=int, default=0, help="random UPS weights")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    command = "python -m remedi_patches.embedded.remedi " + " ".join(sys.argv[1:] if argv is None else argv)
    out = build_embedded_remedi(args.out_dir, backbone_dir=args.backbone, ups_positions=args.ups_positions,
                                ups_init=args.ups_init, seed=args.seed, command=command.strip())
    print(f"embedded RemeDi (untrained UPS, TPS = {args.backbone}) written to {out}")
    return out


if __name__ == "__main__":
    run_main(main)
