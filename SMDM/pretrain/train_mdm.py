r"""Masked-diffusion pretraining of SMDM's TransEncoder on packed token files (Lightning Fabric).

    python SMDM/pretrain/train_mdm.py       # the embedded recipe: Diff_LLaMA_embedded on the embedded task, 300 steps
                                            # of 64 x 128 tokens (~6 min on a CPU) -> out/train_mdm/final
    python SMDM/pretrain/train_mdm.py --model 170 --flops 10. --devices 8 --strategy fsdp \
        --train_data_dir data/slimpajama/train --val_data_dir data/slimpajama/val

With no --train_data_dir, settings left out take the embedded recipe (remedi_patches.embedded.build's
PRETRAIN_RECIPE: the shipped backbone's pretraining), and the data is the embedded task (50000 training / 500
validation problems) packed once by prepare_data.py with the shipped tokenizer into <out_dir>/embedded_data. With
--train_data_dir they take upstream SMDM's defaults (GENERAL_DEFAULTS). Every flag given explicitly wins.

Packed data comes from SMDM/scripts/prepare_data.py, which records its tokenizer: the model's vocabulary
defaults to that tokenizer's size (a mismatch with --vocab_size, or a token id beyond the vocabulary, is an
error before training), and the export (<out_dir>/final) carries the tokenizer, so it loads on its own
(`generate.py --model <out_dir>/final`). The plan is printed before the first step, with a warning when the
run is far too big for a CPU.

Objective (lit_gpt.diffusion): t ~ U(0, 1), each token masked with p_mask = (1 - eps) t + eps,
loss = sum over masked tokens of CE / p_mask, divided by b * l; with probability
--random_length_prob a step trains on a random prefix length in [1, seq_len].

Determinism: the samples and the noise of optimizer step s are drawn from generators seeded by
(--seed, s) for the whole global batch, and each rank / micro-batch takes its slice. A run killed
and resumed from its newest checkpoint therefore continues the same loss trajectory, and a
2-device run follows a 1-device run of the same global batch up to floating-point noise.
The loop (accumulation, clipping, NaN / divergence guard, checkpoints, resume, lock) is lit_gpt.training.fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.config import Config, num_non_embedding_params
from lit_gpt.diffusion import NoiseDraw, draw_noise, forward_process, mdm_loss, seeded_generator
from lit_gpt.model import TransEncoder
from lit_gpt.packed_dataset import PackedDataset, SampleOrder
from lit_gpt.training import (ExportConfig, FabricConfig, OptimConfig, RunConfig, SMDMModelConfig, Schedule,
                              TrainGroup, UserError, apply_gradient_checkpointing, check_data_vocab,
                              check_writable_dir, claim_outputs, cpu_gflops, csv_logger, default_micro_batch_size,
                              export_smdm, fit, grad_accum_steps, heavy_cpu_warning, hparams_of, micro_batch_rows,
                              num_parameters, read_packed_meta, require_path, resume_path, setup_fabric,
                              setup_model_and_optimizer, smdm_config, tokenizer_vocab_error, warmup_for)
from remedi_patches.cli import (ArgumentParser, add_config_args, arg, config_from_args, fill_none, recipe_help,
                                run_main)
from remedi_patches.data import EMBEDDED_SEED
from remedi_patches.embedded import TOKENIZER_DIR
from remedi_patches.embedded.build import PRETRAIN_RECIPE as EMBEDDED_RECIPE, TASK_SIZES, task_data

STREAM_TRAIN, STREAM_VAL = 0, 1
# defaults resolved by MDMConfig.check(): EMBEDDED_RECIPE with no --train_data_dir, else upstream SMDM's
GENERAL_DEFAULTS = {"model_name": None, "seq_len": 2048, "max_steps": None,
                    "global_batch_size": OptimConfig.global_batch_size, "micro_batch_size": None, "lr": OptimConfig.lr,
                    "min_lr": OptimConfig.min_lr, "warmup_steps": None, "seed": ExportConfig.seed,
                    "eval_interval": 0, "eval_iters": 100, "eval_mc": 128, "save_interval": ExportConfig.save_interval}


def _by_data(name: str, what: str, general: object = None) -> str:
    """Help text of a default that depends on --train_data_dir (`general`: what the upstream default means)."""
    return recipe_help(what, EMBEDDED_RECIPE[name], "with no --train_data_dir (the embedded recipe)",
                       GENERAL_DEFAULTS[name] if general is None else general)


@dataclass
class MDMConfig(FabricConfig, RunConfig, ExportConfig, OptimConfig, SMDMModelConfig):
    train_data_dir: Optional[Path] = arg(None, "folder of packed *.bin files (prepare_data.py); default: the "
                                         "embedded task, packed into <out_dir>/embedded_data", group="data")
    val_data_dir: Optional[Path] = arg(None, "folder of packed *.bin validation files; default: the embedded task's "
                                       "with no --train_data_dir, else none", group="data")
    seq_len: Optional[int] = arg(None, _by_data("seq_len", "tokens per training sequence"), group="data")
    max_steps: Optional[int] = arg(None, _by_data("max_steps", "optimizer steps", "--flops decides"),
                                   group="schedule")
    flops: Optional[float] = arg(None, "compute budget in 1e18 FLOPs: max_steps = flops / (6 N global_batch "
                                 "seq_len), N = non-embedding parameters (upstream's rule); default none: "
                                 "--max_steps sets the schedule", group="schedule")
    eval_interval: Optional[int] = arg(None, _by_data("eval_interval", "validate every N steps (0: only after the "
                                                      "last)"), group="schedule")
    eval_iters: Optional[int] = arg(None, _by_data("eval_iters", "validation micro-batches per device"),
                                    group="schedule")
    eval_mc: Optional[int] = arg(None, _by_data("eval_mc", "Monte-Carlo noise draws per validation batch"),
                                 group="schedule")
    # the model and optimisation defaults of the shared configs, made data-dependent
    model_name: Optional[str] = arg(None, _by_data("model_name", "config name, e.g. Diff_LLaMA_170M or "
                                                   "Diff_LLaMA_tiny", "none: pass it or --model"), group="model")
    lr: Optional[float] = arg(None, _by_data("lr", "peak learning rate"), group="optimisation")
    min_lr: Optional[float] = arg(None, _by_data("min_lr", "final learning rate of the cosine decay"),
                                  group="optimisation")
    warmup_steps: Optional[int] = arg(None, _by_data("warmup_steps", "linear warmup steps, capped at max_steps",
                                                     "max(1%% of max_steps, 100)"), group="optimisation")
    micro_batch_size: Optional[int] = arg(None, _by_data("micro_batch_size", "sequences per device per forward",
                                                         "by model size as upstream (32/16/8/4)"),
                                          group="optimisation")
    global_batch_size: Optional[int] = arg(None, _by_data("global_batch_size", "sequences per optimizer step over "
                                                          "all devices (gradient accumulation fills the gap)"),
                                           group="optimisation")
    save_interval: Optional[int] = arg(None, _by_data("save_interval", "save a checkpoint every N optimizer steps "
                                                      "(and always after the last one)"), group="run")
    seed: Optional[int] = arg(None, _by_data("seed", "seeds model init, data order and noise"), group="run")
    eps: float = arg(1e-3, "p_mask = (1 - eps) t + eps", group="diffusion")
    random_length_prob: float = arg(0.01, "share of steps trained on a random length in [1, seq_len]",
                                    group="diffusion")
    tokenizer: Optional[str] = arg(None, "tokenizer folder to ship with the export (and to check against the "
                                   "model's vocabulary); default: the one prepare_data.py recorded for "
                                   "--train_data_dir", group="model")
    out_dir: Path = arg(Path("out/train_mdm"), "checkpoints iter-XXXXXX-ckpt.pth, logs/version_k/metrics.csv and "
                        "the final export", group="run")

    @property
    def embedded_data(self) -> bool:
        return self.train_data_dir is None

    def resolve_defaults(self) -> "MDMConfig":
        """Fill the data-dependent defaults left None: EMBEDDED_RECIPE with no --train_data_dir, GENERAL_DEFAULTS
        otherwise (a given --model keeps the recipe's model_name out, --flops its max_steps). Idempotent."""
        given = [name for name, flag in (("model_name", self.model), ("max_steps", self.flops)) if flag is not None]
        return fill_none(self, EMBEDDED_RECIPE if self.embedded_data else GENERAL_DEFAULTS, keep_none=given)

    def check(self) -> "MDMConfig":
        """UserError / FileNotFoundError naming the first bad flag and the fix; nothing is loaded. Resolves the
        data-dependent defaults first (resolve_defaults)."""
        self.resolve_defaults()
        self.check_fabric(), self.check_run(), self.check_optim()
        require_path(self.train_data_dir, "--train_data_dir")
        require_path(self.val_data_dir, "--val_data_dir")
        require_path(self.tokenizer, "--tokenizer", kind="model")
        for name in ("seq_len", "eval_iters", "eval_mc", "save_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_interval < 0:
            raise UserError(f"--eval_interval must be >= 0, got {self.eval_interval}")
        if not 0 <= self.eps < 1 or not 0 <= self.random_length_prob <= 1:
            raise UserError(f"--eps must be in [0, 1) and --random_length_prob in [0, 1], got {self.eps}, "
                            f"{self.random_length_prob}")
        return self


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    return add_config_args(parser, MDMConfig)


def parse_args(argv: Optional[list[str]] = None) -> MDMConfig:
    return config_from_args(MDMConfig, build_parser().parse_args(argv)).check()


def model_config(cfg: MDMConfig) -> Config:
    config = smdm_config(cfg)
    if cfg.seq_len > config.block_size:
        raise UserError(f"--seq_len {cfg.seq_len} exceeds the model's block_size {config.block_size}; lower it.")
    return config


def resolve_max_steps(cfg: MDMConfig, config: Config) -> int:
    if (cfg.max_steps is None) == (cfg.flops is None):
        raise UserError("Pass exactly one of --max_steps or --flops (compute budget in 1e18 FLOPs).")
    if cfg.max_steps is not None:
        steps = cfg.max_steps
    else:
        steps = int(cfg.flops * 1e18 / (6 * num_non_embedding_params(config) * cfg.global_batch_size * cfg.seq_len))
    if steps < 1:
        raise UserError(f"The schedule has {steps} optimizer steps; raise --max_steps / --flops.")
    return steps


def use_embedded_data(cfg: MDMConfig) -> None:
    """With no --train_data_dir: the embedded task packed into <out_dir>/embedded_data (made once, then reused) as
    the training data, and as the validation data unless --val_data_dir is given."""
    folder = check_writable_dir(cfg.out_dir, "--out_dir") / "embedded_data"
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"No --train_data_dir: the embedded recipe ({cfg.model_name or f'--model {cfg.model}'}, {cfg.max_steps} "
              f"steps of {cfg.global_batch_size} x {cfg.seq_len} tokens, lr {cfg.lr:g}) on the embedded task "
              f"({TASK_SIZES['train']} / {TASK_SIZES['val']} problems, tokenizer {TOKENIZER_DIR}) packed into "
              f"{folder}", flush=True)
    cfg.train_data_dir = task_data(folder, "train", TOKENIZER_DIR, EMBEDDED_SEED)
    cfg.val_data_dir = cfg.val_data_dir or task_data(folder, "val", TOKENIZER_DIR, EMBEDDED_SEED)


def data_vocab(cfg: MDMConfig) -> Optional[dict]:
    """The prepare_data.py record of --train_data_dir; fills --vocab_size from it when not given (printed)."""
    meta = read_packed_meta(cfg.train_data_dir)
    if meta is not None and cfg.vocab_size is None:
        cfg.vocab_size = int(meta["vocab_size"])
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"vocab_size {cfg.vocab_size}: the tokenizer the packed data was made with "
                  f"({meta.get('tokenizer')})", flush=True)
    return meta


def export_tokenizer(cfg: MDMConfig, meta: Optional[dict], config: Config):
    """The tokenizer the export ships: --tokenizer, else the data's recorded one if it still exists (None
    otherwise); UserError when it does not fit the model's vocabulary."""
    source = cfg.tokenizer or (meta or {}).get("tokenizer")
    if source is None or (cfg.tokenizer is None and not Path(source).exists()):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    problem = tokenizer_vocab_error(tokenizer, config.vocab_size, config.name)
    if problem:
        raise UserError(f"{problem} (tokenizer {source})")
    return tokenizer


def check_vocab(tokens: torch.Tensor, vocab_size: int, data_dir: Path) -> None:
    top = int(tokens.max())
    if top >= vocab_size:
        raise UserError(f"Token id {top} in {data_dir} is >= vocab_size {vocab_size} (the mask id); pass "
                        "--vocab_size matching the tokenizer the data was prepared with.")


def main(argv: Optional[list[str]] = None) -> list[float]:
    """Train; returns the per-step losses of this run (on every rank)."""
    cfg = parse_args(argv)
    if cfg.embedded_data:
        use_embedded_data(cfg)
    vocab_given = cfg.vocab_size is not None
    meta = data_vocab(cfg)
    config = model_config(cfg)
    max_steps = resolve_max_steps(cfg, config)
    check_data_vocab([cfg.train_data_dir, cfg.val_data_dir], config.vocab_size, config.name, vocab_given)
    tokenizer = export_tokenizer(cfg, meta, config)
    n_million = num_non_embedding_params(config) / 1e6
    cfg.micro_batch_size = cfg.micro_batch_size or default_micro_batch_size(n_million)
    grad_accum = grad_accum_steps(cfg.global_batch_size, cfg.micro_batch_size, cfg.world_size)
    export_dir = cfg.export_dir or cfg.out_dir / "final"
    with claim_outputs(cfg.out_dir, folders={"--export_dir": cfg.export_dir}):
        train_data = PackedDataset.from_dir(cfg.train_data_dir, cfg.seq_len)
        val_data = PackedDataset.from_dir(cfg.val_data_dir, cfg.seq_len) if cfg.val_data_dir else None
        fabric = setup_fabric(cfg, loggers=[csv_logger(cfg.out_dir)])
        hparams = {**hparams_of(cfg), "model_name": config.name, "vocab_size": config.vocab_size,
                   "max_steps": max_steps}
        fabric.print(f"{config.name}: {n_million:.2f}M non-embedding parameters, vocab {config.vocab_size}, "
                     f"{max_steps} steps of {cfg.global_batch_size} x {cfg.seq_len} tokens, {grad_accum} "
                     f"micro-batches of {cfg.micro_batch_size} per device per step, {len(train_data)} training "
                     f"sequences on {fabric.device}", flush=True)  # the plan, before the first (maybe long) step
        if fabric.device.type == "cpu":
            warning = heavy_cpu_warning(config, cfg.global_batch_size, cfg.micro_batch_size, cfg.seq_len, max_steps,
                                        cpu_gflops())
            if warning:
                fabric.print(warning, flush=True)

        fabric.seed_everything(cfg.seed)
        with fabric.init_module():
            model = TransEncoder(config)
        fabric.print(f"Total parameters {num_parameters(model):,}")
        apply_gradient_checkpointing(model, cfg)
        state = setup_model_and_optimizer(fabric, model, cfg, hparams)
        model = state["model"]

        G, L, micro = cfg.global_batch_size, cfg.seq_len, cfg.micro_batch_size
        order = SampleOrder(len(train_data), cfg.seed)

        @lru_cache(maxsize=1)
        def step_plan(step: int) -> tuple[list[int], NoiseDraw]:
            """Samples and noise of one optimizer step for the whole global batch (same on every rank)."""
            draw = draw_noise(seeded_generator(cfg.seed, STREAM_TRAIN, step), G, L, cfg.random_length_prob)
            return order.indices(step * G, G), draw

        def step_fn(step: int, micro_idx: int) -> tuple[torch.Tensor, dict]:
            indices, draw = step_plan(step)
            rows = micro_batch_rows(micro_idx, micro, fabric.global_rank, fabric.world_size)
            tokens = train_data.batch(indices[rows])[:, :draw.length]  # (micro, length)
            check_vocab(tokens, config.vocab_size, cfg.train_data_dir)
            tokens = tokens.to(fabric.device)
            u = draw.u[rows, :draw.length]
            noisy, masked, p_mask = forward_process(tokens, draw.t[rows], u, config.mask_id, cfg.eps)
            return mdm_loss(model(noisy), tokens, masked, p_mask), {}

        @torch.no_grad()
        def evaluate() -> dict:
            """Mean loss over --eval_iters batches x --eval_mc noise draws, the same draws at every call."""
            model.eval()
            n, rank = micro * fabric.world_size, fabric.global_rank
            total = torch.zeros((), device=fabric.device)
            for k in range(cfg.eval_iters):
                tokens = val_data.batch([(k * n + rank * micro + i) % len(val_data) for i in range(micro)])
                check_vocab(tokens, config.vocab_size, cfg.val_data_dir)
                tokens = tokens.to(fabric.device)
                for i in range(cfg.eval_mc):
                    draw = draw_noise(seeded_generator(cfg.seed, STREAM_VAL, k, i), n, L)
                    rows = slice(rank * micro, (rank + 1) * micro)
                    noisy, masked, p_mask = forward_process(tokens, draw.t[rows], draw.u[rows], config.mask_id,
                                                            cfg.eps)
                    total += mdm_loss(model(noisy), tokens, masked, p_mask)
            model.train()
            return {"val_loss": fabric.all_reduce(total / (cfg.eval_iters * cfg.eval_mc), reduce_op="mean").item()}

        schedule = Schedule(max_steps=max_steps, warmup_steps=warmup_for(max_steps, cfg.warmup_steps),
                            grad_accum=grad_accum, grad_clip=cfg.grad_clip, save_interval=cfg.save_interval,
                            eval_interval=cfg.eval_interval, divergence_factor=cfg.divergence_factor)
        group = TrainGroup(model, state["optimizer"], lr=cfg.lr, min_lr=cfg.min_lr)
        result = fit(fabric, state, step_fn, [group], schedule, cfg.out_dir,
                     evaluate if val_data is not None else None, resume=resume_path(cfg.out_dir, cfg.resume),
                     hparams=hparams)
        export_smdm(fabric, cfg.out_dir, config, export_dir, tokenizer)
    return result.losses


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_main(main)
