"""Diffusion SFT of an SMDM TransEncoder: the prompt stays clean, the answer is masked (Fabric).

    python SMDM/sft/train_sft.py --pretrained_path workdir/mdm/final --tokenizer path/to/tokenizer \
        --dataset data/sft.jsonl --seq_len 1024 --epochs 3

Each row is [prompt][answer][EOS padding] (the padding counts as answer, as in LLaDA SFT).
Noise: t ~ U(0, 1) per row, answer tokens masked with p_mask = (1 - eps) t + eps, prompt tokens
never. Loss (`remedi_patches.losses.tps_loss`): per row, sum of CE / p_mask over masked tokens
divided by the row's answer length; mean over rows. Data: prompt/answer records (GSM8K,
MATH, s1K, OpenCoder layouts, or --prompt_field/--answer_field), plain --text_field, or chat
conversations (`messages` / `conversations`); --chat_template renders them with the
tokenizer's chat template (the last assistant turn is the answer).

Samples and noise of each optimizer step come from generators seeded by (--seed, step), so a
resumed run continues the uninterrupted trajectory (same machinery as train_mdm.py).
"""
import argparse
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # SMDM/ (lit_gpt)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root (remedi_patches)

import torch

from lit_gpt.config import Config, num_non_embedding_params
from lit_gpt.diffusion import NoiseDraw, draw_noise, forward_process, seeded_generator
from lit_gpt.model import CONFIG_FILE, TransEncoder, load_smdm_config, load_weights
from lit_gpt.packed_dataset import SampleOrder
from lit_gpt.training import (Schedule, add_fabric_args, add_model_args, add_optim_args, add_run_args,
                              config_from_args, csv_logger, default_micro_batch_size, export_smdm, fit,
                              grad_accum_steps, hparams_of, init_state, micro_batch_rows, num_parameters,
                              setup_fabric, warmup_for)
from remedi_patches.data import answer_mask, build_sft_examples, column_names, load_records, resolve_fields
from remedi_patches.losses import tps_loss

STREAM_TRAIN = 0
# flags a resumed run must keep to continue the same trajectory
TRAJECTORY_KEYS = ("seed", "global_batch_size", "seq_len", "eps", "dataset", "limit")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--pretrained_path", type=Path, default=None,
                   help="weights to start from: an SMDM folder (its smdm_config.json sets the model), a .safetensors "
                        "file or an iter-*-ckpt.pth (with --model / --model_name); none: random init")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (AutoTokenizer.from_pretrained)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True,
                   help="local .json/.jsonl/.parquet file or folder, hub name, or 'embedded'")
    d.add_argument("--split", default="train", help="dataset split")
    d.add_argument("--subset", default=None, help="dataset subset / sub-folder")
    d.add_argument("--text_field", default=None, help="train on this whole field (no prompt)")
    d.add_argument("--prompt_field", default=None, help="prompt field (default: found from the known layouts)")
    d.add_argument("--answer_field", default=None, help="answer field (default: found from the known layouts)")
    d.add_argument("--chat_template", action="store_true", help="render prompt and answer with the tokenizer's "
                                                                  "chat template")
    d.add_argument("--prompt_template", default=None,
                   help="prompt text around {question} for non-chat data; default 'Question: {question}\\nAnswer:' "
                        "(the format train_remedi.py and the evaluators use)")
    d.add_argument("--limit", type=int, default=None, help="use at most this many records")
    d.add_argument("--seq_len", type=int, default=2048, help="tokens per row (prompt + answer + EOS padding)")
    s = p.add_argument_group("schedule")
    s.add_argument("--epochs", type=float, default=3.0, help="passes over the data (ignored with --max_steps)")
    s.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    s.add_argument("--eps", type=float, default=1e-3, help="p_mask = (1 - eps) t + eps")
    add_optim_args(p, lr=2e-4, min_lr=2e-5, warmup_steps=200)  # upstream SMDM SFT's schedule
    add_run_args(p, out_dir="workdir/sft")
    add_fabric_args(p)
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> Config:
    """From the pretrained SMDM folder's smdm_config.json, else from --model / --model_name."""
    folder_config = args.pretrained_path is not None and (args.pretrained_path / CONFIG_FILE).is_file()
    if folder_config:
        if args.model is not None or args.model_name is not None or args.vocab_size is not None:
            raise ValueError(f"{args.pretrained_path} is an SMDM folder whose {CONFIG_FILE} sets the model; "
                             "drop --model / --model_name / --vocab_size.")
        return load_smdm_config(args.pretrained_path)
    return config_from_args(args)


def sft_noise(input_ids: torch.Tensor, prompt_len: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process with the prompt kept clean: (b, l) ids, (b,) prompt lengths, (b,) t, (b, l) u ->
    noisy, masked (answer positions only), p_mask."""
    maskable = answer_mask(prompt_len.to(input_ids.device), input_ids.shape[1])
    return forward_process(input_ids, t, u, mask_id, eps, maskable=maskable)


def main(argv: Optional[list[str]] = None) -> list[float]:
    """Train; returns the per-step losses of this run (on every rank)."""
    args = parse_args(argv)
    from transformers import AutoTokenizer

    config = model_config(args)
    if args.seq_len > config.block_size:
        raise ValueError(f"--seq_len {args.seq_len} exceeds the model's block_size {config.block_size}.")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {config.vocab_size} "
                         "(its mask id); use the tokenizer the model was trained with, or set --vocab_size.")
    records = load_records(args.dataset, args.split, args.subset, args.limit)
    fields = resolve_fields(column_names(records), args.text_field, args.prompt_field, args.answer_field)
    ex = build_sft_examples(records, tokenizer, args.seq_len, fields, args.chat_template, args.prompt_template)

    args.micro_batch_size = args.micro_batch_size or default_micro_batch_size(num_non_embedding_params(config) / 1e6)
    G, L, micro = args.global_batch_size, args.seq_len, args.micro_batch_size
    max_steps = args.max_steps or max(1, math.ceil(len(ex) * args.epochs / G))
    fabric = setup_fabric(args, loggers=[csv_logger(args.out_dir)])
    grad_accum = grad_accum_steps(G, micro, fabric.world_size)
    hparams = {**hparams_of(args), "model_name": config.name, "vocab_size": config.vocab_size, "max_steps": max_steps}
    fabric.print(f"{config.name}: {len(ex)} examples ({ex.dropped} dropped, {ex.truncated} cut), {max_steps} steps "
                 f"of {G} x {L} tokens, {grad_accum} micro-batches of {micro} per device per step")

    fabric.seed_everything(args.seed)
    with fabric.init_module():
        model = TransEncoder(config)
    if args.pretrained_path is not None:
        load_weights(model, args.pretrained_path)
        fabric.print(f"Loaded weights from {args.pretrained_path}")
    fabric.print(f"Total parameters {num_parameters(model):,}")
    state = init_state(fabric, model, args, hparams, TRAJECTORY_KEYS)
    model = state["model"]

    order = SampleOrder(len(ex), args.seed)

    @lru_cache(maxsize=1)
    def step_plan(step: int) -> tuple[list[int], NoiseDraw]:
        draw = draw_noise(seeded_generator(args.seed, STREAM_TRAIN, step), G, L)
        return order.indices(step * G, G), draw

    def micro_loss(step: int, micro_idx: int) -> torch.Tensor:
        indices, draw = step_plan(step)
        rows = micro_batch_rows(micro_idx, micro, fabric.global_rank, fabric.world_size)
        idx = torch.tensor(indices[rows])
        tokens = ex.input_ids[idx].to(fabric.device)  # (micro, L)
        noisy, masked, p_mask = sft_noise(tokens, ex.prompt_len[idx], draw.t[rows], draw.u[rows], config.mask_id,
                                          args.eps)
        return tps_loss(model(noisy), tokens, masked, p_mask, ex.answer_len[idx].to(fabric.device))

    schedule = Schedule(max_steps=max_steps, warmup_steps=warmup_for(max_steps, args.warmup_steps), lr=args.lr,
                        min_lr=args.min_lr, grad_accum=grad_accum, grad_clip=args.grad_clip,
                        save_interval=args.save_interval)
    losses = fit(fabric, state, micro_loss, schedule, args.out_dir)
    export_smdm(fabric, args.out_dir, config, args.export_dir or args.out_dir / "final")
    return losses


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
