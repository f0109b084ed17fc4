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
resumed run continues the uninterrupted trajectory (the loop is lit_gpt.training.fit, as in train_mdm.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.config import Config, num_non_embedding_params
from lit_gpt.diffusion import NoiseDraw, draw_noise, forward_process, seeded_generator
from lit_gpt.model import CONFIG_FILE, TransEncoder, load_smdm_config, load_weights
from lit_gpt.packed_dataset import SampleOrder
from lit_gpt.training import (ExportConfig, FabricConfig, OptimConfig, RunConfig, SMDMModelConfig, Schedule,
                              TrainGroup, UserError, claim_outputs, csv_logger, default_micro_batch_size, export_smdm,
                              fit, grad_accum_steps, hparams_of, micro_batch_rows, num_parameters, require_path,
                              resume_path, setup_fabric, setup_model_and_optimizer, smdm_config, warmup_for)
from remedi_patches.cli import ArgumentParser, add_config_args, arg, config_from_args, run_main
from remedi_patches.data import answer_mask, build_sft_examples, column_names, load_records, resolve_fields
from remedi_patches.losses import tps_loss

STREAM_TRAIN = 0
CLI_DEFAULTS = {"warmup_steps": 200}  # upstream SMDM SFT's schedule (lr 2e-4 -> 2e-5 as pretraining)


@dataclass
class SFTConfig(FabricConfig, RunConfig, ExportConfig, OptimConfig, SMDMModelConfig):
    pretrained_path: Optional[Path] = arg(
        None, "weights to start from: an SMDM folder (its smdm_config.json sets the model), a .safetensors file or "
        "an iter-*-ckpt.pth (with --model / --model_name); none: random init", group="model")
    tokenizer: Optional[str] = arg(None, "tokenizer folder (AutoTokenizer.from_pretrained); required", group="model")
    dataset: Optional[str] = arg(None, "local .json/.jsonl/.parquet file or folder, hub name, or 'embedded'; "
                                 "required", group="data")
    split: str = arg("train", "dataset split", group="data")
    subset: Optional[str] = arg(None, "dataset subset / sub-folder", group="data")
    text_field: Optional[str] = arg(None, "train on this whole field (no prompt)", group="data")
    prompt_field: Optional[str] = arg(None, "prompt field (default: found from the known layouts)", group="data")
    answer_field: Optional[str] = arg(None, "answer field (default: found from the known layouts)", group="data")
    chat_template: bool = arg(False, "render prompt and answer with the tokenizer's chat template", group="data")
    prompt_template: Optional[str] = arg(
        None, "prompt text around {question} for non-chat data; default 'Question: {question}\\nAnswer:' (the "
        "format train_remedi.py and the evaluators use)", group="data")
    limit: Optional[int] = arg(None, "use at most this many records", group="data")
    seq_len: int = arg(2048, "tokens per row (prompt + answer + EOS padding)", group="data")
    epochs: float = arg(3.0, "passes over the data (ignored with --max_steps)", group="schedule")
    max_steps: Optional[int] = arg(None, "optimizer steps (default: from --epochs)", group="schedule")
    eps: float = arg(1e-3, "p_mask = (1 - eps) t + eps", group="schedule")
    out_dir: Path = arg(Path("workdir/sft"), "checkpoints iter-XXXXXX-ckpt.pth, logs/version_k/metrics.csv and "
                        "the final export", group="run")

    def check(self) -> "SFTConfig":
        """UserError / FileNotFoundError naming the first bad flag and the fix; nothing is loaded."""
        self.check_fabric(), self.check_run(), self.check_optim()
        for name in ("tokenizer", "dataset"):
            if getattr(self, name) is None:
                raise UserError(f"--{name} is required (see --help)")
        require_path(self.pretrained_path, "--pretrained_path")
        require_path(self.tokenizer, "--tokenizer", kind="model")
        if self.dataset != "embedded":
            require_path(self.dataset, "--dataset", kind="dataset")
        if self.seq_len < 2 or self.save_interval < 1 or not self.epochs > 0:
            raise UserError(f"--seq_len must be >= 2, --save_interval >= 1 and --epochs > 0, got {self.seq_len}, "
                            f"{self.save_interval}, {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1 or self.limit is not None and self.limit < 1:
            raise UserError("--max_steps and --limit must be >= 1 when given")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise UserError(f"--prompt_template {self.prompt_template!r} has no {{question}} placeholder; add one")
        if not 0 <= self.eps < 1:
            raise UserError(f"--eps must be in [0, 1), got {self.eps}")
        return self


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    return add_config_args(parser, SFTConfig, defaults=CLI_DEFAULTS)


def parse_args(argv: Optional[list[str]] = None) -> SFTConfig:
    return config_from_args(SFTConfig, build_parser().parse_args(argv)).check()


def model_config(cfg: SFTConfig) -> Config:
    """From the pretrained SMDM folder's smdm_config.json, else from --model / --model_name."""
    folder_config = cfg.pretrained_path is not None and (cfg.pretrained_path / CONFIG_FILE).is_file()
    if folder_config:
        if cfg.model is not None or cfg.model_name is not None or cfg.vocab_size is not None:
            raise UserError(f"{cfg.pretrained_path} is an SMDM folder whose {CONFIG_FILE} sets the model; "
                            "drop --model / --model_name / --vocab_size.")
        config = load_smdm_config(cfg.pretrained_path)
    else:
        config = smdm_config(cfg)
    if cfg.seq_len > config.block_size:
        raise UserError(f"--seq_len {cfg.seq_len} exceeds the model's block_size {config.block_size}; lower it.")
    return config


def sft_noise(input_ids: torch.Tensor, prompt_len: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process with the prompt kept clean: (b, l) ids, (b,) prompt lengths, (b,) t, (b, l) u ->
    noisy, masked (answer positions only), p_mask."""
    maskable = answer_mask(prompt_len.to(input_ids.device), input_ids.shape[1])
    return forward_process(input_ids, t, u, mask_id, eps, maskable=maskable)


def main(argv: Optional[list[str]] = None) -> list[float]:
    """Train; returns the per-step losses of this run (on every rank)."""
    cfg = parse_args(argv)
    config = model_config(cfg)
    cfg.micro_batch_size = cfg.micro_batch_size or default_micro_batch_size(num_non_embedding_params(config) / 1e6)
    G, L, micro = cfg.global_batch_size, cfg.seq_len, cfg.micro_batch_size
    grad_accum = grad_accum_steps(G, micro, cfg.world_size)
    export_dir = cfg.export_dir or cfg.out_dir / "final"
    with claim_outputs(cfg.out_dir, folders={"--export_dir": cfg.export_dir}):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        if len(tokenizer) > config.vocab_size:
            raise UserError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                            f"{config.vocab_size} (its mask id); use the tokenizer the model was trained with, or "
                            "set --vocab_size.")
        records = load_records(cfg.dataset, cfg.split, cfg.subset, cfg.limit)
        fields = resolve_fields(column_names(records), cfg.text_field, cfg.prompt_field, cfg.answer_field)
        ex = build_sft_examples(records, tokenizer, cfg.seq_len, fields, cfg.chat_template, cfg.prompt_template)
        max_steps = cfg.max_steps or max(1, math.ceil(len(ex) * cfg.epochs / G))

        fabric = setup_fabric(cfg, loggers=[csv_logger(cfg.out_dir)])
        hparams = {**hparams_of(cfg), "model_name": config.name, "vocab_size": config.vocab_size,
                   "max_steps": max_steps}
        fabric.print(f"{config.name}: {len(ex)} examples ({ex.dropped} dropped, {ex.truncated} cut), {max_steps} "
                     f"steps of {G} x {L} tokens, {grad_accum} micro-batches of {micro} per device per step")

        fabric.seed_everything(cfg.seed)
        with fabric.init_module():
            model = TransEncoder(config)
        if cfg.pretrained_path is not None:
            load_weights(model, cfg.pretrained_path)
            fabric.print(f"Loaded weights from {cfg.pretrained_path}")
        fabric.print(f"Total parameters {num_parameters(model):,}")
        state = setup_model_and_optimizer(fabric, model, cfg, hparams)
        model = state["model"]
        order = SampleOrder(len(ex), cfg.seed)

        @lru_cache(maxsize=1)
        def step_plan(step: int) -> tuple[list[int], NoiseDraw]:
            draw = draw_noise(seeded_generator(cfg.seed, STREAM_TRAIN, step), G, L)
            return order.indices(step * G, G), draw

        def step_fn(step: int, micro_idx: int) -> tuple[torch.Tensor, dict]:
            indices, draw = step_plan(step)
            rows = micro_batch_rows(micro_idx, micro, fabric.global_rank, fabric.world_size)
            idx = torch.tensor(indices[rows])
            tokens = ex.input_ids[idx].to(fabric.device)  # (micro, L)
            noisy, masked, p_mask = sft_noise(tokens, ex.prompt_len[idx], draw.t[rows], draw.u[rows],
                                              config.mask_id, cfg.eps)
            return tps_loss(model(noisy), tokens, masked, p_mask, ex.answer_len[idx].to(fabric.device)), {}

        schedule = Schedule(max_steps=max_steps, warmup_steps=warmup_for(max_steps, cfg.warmup_steps),
                            grad_accum=grad_accum, grad_clip=cfg.grad_clip, save_interval=cfg.save_interval,
                            divergence_factor=cfg.divergence_factor)
        group = TrainGroup(model, state["optimizer"], lr=cfg.lr, min_lr=cfg.min_lr)
        result = fit(fabric, state, step_fn, [group], schedule, cfg.out_dir,
                     resume=resume_path(cfg.out_dir, cfg.resume), hparams=hparams)
        export_smdm(fabric, cfg.out_dir, config, export_dir, tokenizer)  # the export loads on its own
    return result.losses


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_main(main)
