r"""RL for diffusion LMs with Lightning Fabric: Remask GRPO (RemeDi), diffu-GRPO (d1), reward-weighted denoising, DPO.

    python SMDM/rl/train_rl.py                 # Remask GRPO on the shipped embedded RemeDi and the embedded task:
                                               # 120 updates of 8 prompts x 8 rollouts, lr 1e-5 (~1 h on a CPU)
    python SMDM/rl/train_rl.py --method diffu_grpo --model_name embedded --mu 2 --beta 0.04
    python SMDM/rl/train_rl.py --model_name path/to/RemeDi-9B --dataset data/gsm8k --reward gsm8k \
        --gen_length 256 --steps 128 --devices 8 --strategy fsdp --gradient_checkpointing

Defaults marked "on the embedded task" apply to --model_name embedded / embedded_remedi with --dataset embedded;
any other model gets the official Remask RL's settings (group 16, lr 3e-6, 16 steps per block of 32, temperatures
1.2). Every flag given explicitly wins. The trainer is remedi_patches.rl.train (methods, normalisation, resume)
and the loop lit_gpt.training.fit; this script is its command line, built from RLConfig.
"""
from __future__ import annotations

from typing import Optional

from remedi_patches.cli import ArgumentParser, add_config_args, config_from_args, run_main
from remedi_patches.rl.train import RLConfig, run


def build_parser() -> ArgumentParser:
    return add_config_args(ArgumentParser(description=__doc__), RLConfig)


def parse_config(argv: Optional[list[str]] = None) -> RLConfig:
    return config_from_args(RLConfig, build_parser().parse_args(argv)).check()


def main(argv: Optional[list[str]] = None) -> dict:
    """CLI entry: train, print the summary (rank 0), return the final metrics with the per-update losses."""
    return run(parse_config(argv))


if __name__ == "__main__":
    run_main(main)
