r"""Remask SFT (RemeDi) with Lightning Fabric: train a UPS head, optionally LoRA on the TPS.

    python SMDM/pretrain/train_remedi.py      # embedded backbone + task, UPS head only, the demo's recipe:
                                              # seq_len 72, batch_size 32, lr 3e-3, warmup 20, ups_width 128,
                                              # 400 updates, 256 held-out rows (a few minutes on a CPU)
    python SMDM/pretrain/train_remedi.py --model_name GSAI-ML/LLaDA-8B-Base --dataset simplescaling/s1K-1.1 \
        --seq_len 1024 --batch_size 1 --lr 1e-4 --save_path checkpoints/ups_head.safetensors
    python SMDM/pretrain/train_remedi.py --model_name iter-010000-ckpt.pth --smdm_size Diff_LLaMA_170M \
        --tokenizer TinyLlama/TinyLlama-1.1B-intermediate-step-480k-1T --dataset data/gsm8k --train_mode joint

Defaults marked "with the embedded model" apply when --model_name is embedded (the default); any other backbone
gets the general defaults (seq_len 128, batch_size 8, lr 1e-4, ...). Every flag given explicitly wins.
The trainer is remedi_patches.remask_sft (config, step function, setup; modes ups_only / joint / alternating)
and the loop lit_gpt.training.fit; this script is its command line, built from RemaskConfig.
"""
from __future__ import annotations

from typing import Optional

from remedi_patches.cli import ArgumentParser, add_config_args, config_from_args, run_main
from remedi_patches.remask_sft import RemaskConfig, run


def build_parser() -> ArgumentParser:
    return add_config_args(ArgumentParser(description=__doc__), RemaskConfig)


def parse_config(argv: Optional[list[str]] = None) -> RemaskConfig:
    return config_from_args(RemaskConfig, build_parser().parse_args(argv)).check()


def main(argv: Optional[list[str]] = None) -> dict:
    """CLI entry: train, print the summary (rank 0), return the final metrics with the per-update losses."""
    return run(parse_config(argv))


if __name__ == "__main__":
    run_main(main)
