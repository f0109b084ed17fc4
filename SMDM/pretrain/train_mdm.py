"""Masked-diffusion pretraining of SMDM's TransEncoder on packed token files (Lightning Fabric).

    python SMDM/pretrain/train_mdm.py --model 170 --flops 10. --devices 8 --strategy fsdp \
        --train_data_dir data/slimpajama/train --val_data_dir data/slimpajama/val

Objective (lit_gpt.diffusion): t ~ U(0, 1), each token masked with p_mask = (1 - eps) t + eps,
loss = sum over masked tokens of CE / p_mask, divided by b * l; with probability
--random_length_prob a step trains on a random prefix length in [1, seq_len].

Determinism: the samples and the noise of optimizer step s are drawn from generators seeded by
(--seed, s) for the whole global batch, and each rank / micro-batch takes its slice. A run killed
and resumed from its newest checkpoint therefore continues the same loss trajectory, and a
2-device run follows a 1-device run of the same global batch up to floating-point noise.
"""
import argparse
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # SMDM/ (lit_gpt)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root

import torch

from lit_gpt.config import Config, num_non_embedding_params
from lit_gpt.diffusion import NoiseDraw, draw_noise, forward_process, mdm_loss, seeded_generator
from lit_gpt.model import TransEncoder
from lit_gpt.packed_dataset import PackedDataset, SampleOrder
from lit_gpt.training import (Schedule, add_fabric_args, add_model_args, add_optim_args, add_run_args,
                              config_from_args, csv_logger, default_micro_batch_size, export_smdm, fit,
                              grad_accum_steps, hparams_of, init_state, micro_batch_rows, num_parameters,
                              setup_fabric, warmup_for)

STREAM_TRAIN, STREAM_VAL = 0, 1
# flags a resumed run must keep to continue the same trajectory
TRAJECTORY_KEYS = ("seed", "global_batch_size", "seq_len", "random_length_prob", "eps")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--train_data_dir", type=Path, required=True, help="folder of packed *.bin files (prepare_data.py)")
    d.add_argument("--val_data_dir", type=Path, default=None, help="folder of packed *.bin validation files")
    d.add_argument("--seq_len", type=int, default=2048, help="tokens per training sequence")
    s = p.add_argument_group("schedule")
    s.add_argument("--max_steps", type=int, default=None, help="optimizer steps (or give --flops)")
    s.add_argument("--flops", type=float, default=None,
                   help="compute budget in 1e18 FLOPs: max_steps = flops / (6 N global_batch seq_len), "
                        "N = non-embedding parameters (upstream's rule)")
    s.add_argument("--eval_interval", type=int, default=0, help="validate every N steps (0: only after the last)")
    s.add_argument("--eval_iters", type=int, default=100, help="validation micro-batches per device")
    s.add_argument("--eval_mc", type=int, default=128, help="Monte-Carlo noise draws per validation batch")
    x = p.add_argument_group("diffusion")
    x.add_argument("--eps", type=float, default=1e-3, help="p_mask = (1 - eps) t + eps")
    x.add_argument("--random_length_prob", type=float, default=0.01,
                   help="share of steps trained on a random length in [1, seq_len]")
    add_optim_args(p, lr=2e-4, min_lr=2e-5)
    add_run_args(p, out_dir="workdir/mdm")
    add_fabric_args(p)
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> Config:
    config = config_from_args(args)
    if args.seq_len > config.block_size:
        raise ValueError(f"--seq_len {args.seq_len} exceeds the model's block_size {config.block_size}.")
    return config


def resolve_max_steps(args: argparse.Namespace, config: Config) -> int:
    if (args.max_steps is None) == (args.flops is None):
        raise ValueError("Pass exactly one of --max_steps or --flops (compute budget in 1e18 FLOPs).")
    if args.max_steps is not None:
        steps = args.max_steps
    else:
        steps = int(args.flops * 1e18 / (6 * num_non_embedding_params(config) * args.global_batch_size * args.seq_len))
    if steps < 1:
        raise ValueError(f"The schedule has {steps} optimizer steps; raise --max_steps / --flops.")
    return steps


def check_vocab(tokens: torch.Tensor, vocab_size: int, data_dir: Path) -> None:
    top = int(tokens.max())
    if top >= vocab_size:
        raise ValueError(f"Token id {top} in {data_dir} is >= vocab_size {vocab_size} (the mask id); pass "
                         "--vocab_size matching the tokenizer the data was prepared with.")


def main(argv: Optional[list[str]] = None) -> list[float]:
    """Train; returns the per-step losses of this run (on every rank)."""
    args = parse_args(argv)
    config = model_config(args)
    max_steps = resolve_max_steps(args, config)
    n_million = num_non_embedding_params(config) / 1e6
    args.micro_batch_size = args.micro_batch_size or default_micro_batch_size(n_million)
    train_data = PackedDataset.from_dir(args.train_data_dir, args.seq_len)
    val_data = PackedDataset.from_dir(args.val_data_dir, args.seq_len) if args.val_data_dir else None

    fabric = setup_fabric(args, loggers=[csv_logger(args.out_dir)])
    grad_accum = grad_accum_steps(args.global_batch_size, args.micro_batch_size, fabric.world_size)
    hparams = {**hparams_of(args), "model_name": config.name, "vocab_size": config.vocab_size, "max_steps": max_steps}
    fabric.print(f"{config.name}: {n_million:.2f}M non-embedding parameters, {max_steps} steps of "
                 f"{args.global_batch_size} x {args.seq_len} tokens, {grad_accum} micro-batches of "
                 f"{args.micro_batch_size} per device per step, {len(train_data)} training sequences")

    fabric.seed_everything(args.seed)
    with fabric.init_module():
        model = TransEncoder(config)
    fabric.print(f"Total parameters {num_parameters(model):,}")
    state = init_state(fabric, model, args, hparams, TRAJECTORY_KEYS)
    model = state["model"]

    G, L, micro = args.global_batch_size, args.seq_len, args.micro_batch_size
    order = SampleOrder(len(train_data), args.seed)

    @lru_cache(maxsize=1)
    def step_plan(step: int) -> tuple[list[int], NoiseDraw]:
        """Samples and noise of one optimizer step for the whole global batch (same on every rank)."""
        draw = draw_noise(seeded_generator(args.seed, STREAM_TRAIN, step), G, L, args.random_length_prob)
        return order.indices(step * G, G), draw

    def micro_loss(step: int, micro_idx: int) -> torch.Tensor:
        indices, draw = step_plan(step)
        rows = micro_batch_rows(micro_idx, micro, fabric.global_rank, fabric.world_size)
        tokens = train_data.batch(indices[rows])[:, :draw.length]  # (micro, length)
        check_vocab(tokens, config.vocab_size, args.train_data_dir)
        tokens = tokens.to(fabric.device)
        u = draw.u[rows, :draw.length]
        noisy, masked, p_mask = forward_process(tokens, draw.t[rows], u, config.mask_id, args.eps)
        return mdm_loss(model(noisy), tokens, masked, p_mask)

    @torch.no_grad()
    def evaluate() -> float:
        """Mean loss over --eval_iters batches x --eval_mc noise draws, the same draws at every call."""
        model.eval()
        n, rank = micro * fabric.world_size, fabric.global_rank
        total = torch.zeros((), device=fabric.device)
        for k in range(args.eval_iters):
            tokens = val_data.batch([(k * n + rank * micro + i) % len(val_data) for i in range(micro)])
            check_vocab(tokens, config.vocab_size, args.val_data_dir)
            tokens = tokens.to(fabric.device)
            for i in range(args.eval_mc):
                draw = draw_noise(seeded_generator(args.seed, STREAM_VAL, k, i), n, L)
                rows = slice(rank * micro, (rank + 1) * micro)
                noisy, masked, p_mask = forward_process(tokens, draw.t[rows], draw.u[rows], config.mask_id, args.eps)
                total += mdm_loss(model(noisy), tokens, masked, p_mask)
        model.train()
        return fabric.all_reduce(total / (args.eval_iters * args.eval_mc), reduce_op="mean").item()

    schedule = Schedule(max_steps=max_steps, warmup_steps=warmup_for(max_steps, args.warmup_steps), lr=args.lr,
                        min_lr=args.min_lr, grad_accum=grad_accum, grad_clip=args.grad_clip,
                        save_interval=args.save_interval, eval_interval=args.eval_interval)
    losses = fit(fabric, state, micro_loss, schedule, args.out_dir, evaluate if val_data is not None else None)
    export_smdm(fabric, args.out_dir, config, args.export_dir or args.out_dir / "final")
    return losses


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
