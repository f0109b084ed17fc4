"""Diffusion SFT of an SMDM TransEncoder or a native LLaDA: the prompt stays clean, the answer is masked (Fabric).

    python SMDM/sft/train_sft.py          # the embedded recipe: the shipped backbone on the embedded task, 2000 steps
                                          # of 64 x 72 tokens (~30 min on a CPU) -> out/train_sft/final
    python SMDM/sft/train_sft.py --pretrained_path out/train_mdm/final     # the build's SFT stage on your model
    python SMDM/sft/train_sft.py --pretrained_path path/to/smdm_folder --tokenizer path/to/tokenizer \
        --dataset data/sft.jsonl --seq_len 1024 --epochs 3
    python SMDM/sft/train_sft.py --model_name GSAI-ML/LLaDA-8B-Instruct --dataset data/sft.jsonl --chat_template \
        --lora_r 16 --strategy fsdp --devices 8 --gradient_checkpointing    # LLaDA: LoRA adapter -> out/train_sft/final

LLaDA (--model_name a LLaDA folder or hub name, remedi_patches.llada): every weight trains (the export is a
transformers folder with the tokenizer, read by load_backbone and generate.py --model), or with --lora_r a PEFT
LoRA adapter on the frozen model (--lora_alpha --lora_dropout --lora_target; the export is the adapter folder:
generate.py --model <LLaDA> --lora_path <export>). --strategy fsdp shards it one LLaDABlock per unit;
--gradient_checkpointing recomputes the blocks in backward. Its defaults are the seeds' LLaDA SFT (LLADA_DEFAULTS:
lr 2e-5, 10000 steps, 4 rows per device of up to 4096 tokens), whatever the data. Checkpoints of a LoRA run hold the
adapter alone (under FSDP the whole model, as Fabric gathers it).

Defaults: with no --pretrained_path / --model / --model_name the model is the shipped embedded backbone
(remedi_patches/embedded/assets/backbone); --tokenizer defaults to the tokenizer an SMDM --pretrained_path folder
ships; --dataset to 'embedded' (the project's task). On the embedded task, settings left out take the embedded
recipe (remedi_patches.embedded.build's SFT_RECIPE: the shipped backbone's SFT); on other data upstream SMDM SFT's
defaults (GENERAL_DEFAULTS), with rows as long as the model's window (at most 2048); a LLaDA model takes
LLADA_DEFAULTS. Every flag given explicitly wins.

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

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.config import Config, name_to_config, num_non_embedding_params
from lit_gpt.diffusion import NoiseDraw, draw_noise, forward_process, seeded_generator
from lit_gpt.model import CONFIG_FILE, TransEncoder, load_smdm_config, load_weights
from lit_gpt.packed_dataset import SampleOrder
from lit_gpt.training import (ExportConfig, FabricConfig, OptimConfig, RunConfig, SMDMModelConfig, Schedule,
                              TrainGroup, UserError, apply_gradient_checkpointing, build_optimizer, claim_outputs,
                              csv_logger, default_micro_batch_size, default_precision, export_smdm, fit,
                              grad_accum_steps, hparams_of, latest_checkpoint, micro_batch_rows, num_parameters,
                              require_finite, require_path, resume_path, setup_fabric, setup_model_and_optimizer,
                              smdm_config, warmup_for)
from remedi_patches.backbones import (EMBEDDED_DIR, TOKENIZER_FILES, Backbone, detect_kind, fsdp_block_classes,
                                      load_backbone, load_tokenizer, max_length_of)
from remedi_patches.cli import (ArgumentParser, add_config_args, arg, config_from_args, fill_none, recipe_help,
                                run_main)
from remedi_patches.data import answer_mask, build_sft_examples, column_names, load_records, resolve_fields
from remedi_patches.embedded.build import SFT_RECIPE as EMBEDDED_RECIPE
from remedi_patches.losses import tps_loss
from remedi_patches.modeling_wrappers import has_ups_stream, logits_of
from remedi_patches.remask_sft import PRECISION_DTYPES, export_model, resolve_lora_target
from remedi_patches.sources import is_hub_name

STREAM_TRAIN = 0
EPOCHS = 3.0
MAX_SEQ_LEN = 2048  # upstream's rows; a model with a shorter window gets rows of its window
# defaults resolved by SFTConfig.check(): EMBEDDED_RECIPE on the embedded task, else upstream SMDM SFT's (its
# schedule: lr 2e-4 -> 2e-5 as pretraining, 200 warmup steps); seq_len None: the model's window (model_config)
GENERAL_DEFAULTS = {"seq_len": None, "max_steps": None, "global_batch_size": OptimConfig.global_batch_size,
                    "micro_batch_size": None, "lr": OptimConfig.lr, "min_lr": OptimConfig.min_lr, "warmup_steps": 200,
                    "seed": ExportConfig.seed, "save_interval": ExportConfig.save_interval, "limit": None}
# a LLaDA --model_name: the seeds' LLaDA SFT (training README: learning rate 2e-5, 10000 steps, batch 4, rows up to
# 4096 tokens); they name no warmup nor floor: LLaDA's paper SFT warms up 50 steps and ends at a tenth of the peak.
# global_batch_size None: micro_batch_size x devices (no accumulation)
LLADA_MAX_SEQ_LEN = 4096
LLADA_DEFAULTS = {"seq_len": None, "max_steps": 10000, "global_batch_size": None, "micro_batch_size": 4, "lr": 2e-5,
                  "min_lr": 2e-6, "warmup_steps": 50, "seed": ExportConfig.seed, "save_interval": 1000, "limit": None}
LORA_DEFAULTS = {"lora_dropout": 0.05, "lora_target": "auto"}  # lora_alpha: 2 x lora_r
LORA_KEY_SEP = ":"  # stands for the dots of the adapter's parameter names in checkpoints (module names hold no dots)


def _by_data(name: str, what: str, general: object = None, llada: object = None) -> str:
    """Help text of a default that depends on --dataset and the model (`general` / `llada`: what the other
    defaults mean)."""
    text = recipe_help(what, EMBEDDED_RECIPE[name], "on the embedded task (the embedded recipe)",
                       GENERAL_DEFAULTS[name] if general is None else general)
    return f"{text}; {LLADA_DEFAULTS[name] if llada is None else llada} with a LLaDA --model_name"


@dataclass
class SFTConfig(FabricConfig, RunConfig, ExportConfig, OptimConfig, SMDMModelConfig):
    pretrained_path: Optional[Path] = arg(
        None, "weights to start from: an SMDM folder (its smdm_config.json sets the model), a .safetensors file or "
        "an iter-*-ckpt.pth (with --model / --model_name); default: the shipped embedded backbone, or random init "
        "when --model / --model_name is given (an SMDM config)", group="model")
    model_name: Optional[str] = arg(
        None, "an SMDM config (e.g. Diff_LLaMA_170M, Diff_LLaMA_tiny; with --pretrained_path or random init), or a "
        "LLaDA folder or hub name (e.g. GSAI-ML/LLaDA-8B-Instruct) whose weights are fine-tuned", group="model")
    tokenizer: Optional[str] = arg(None, "tokenizer folder (AutoTokenizer.from_pretrained); default: the one the "
                                   "--pretrained_path folder ships", group="model")
    dataset: str = arg("embedded", "local .json/.jsonl/.parquet file or folder, hub name, or 'embedded' (the "
                       "project's task)", group="data")
    split: str = arg("train", "dataset split", group="data")
    subset: Optional[str] = arg(None, "dataset subset / sub-folder", group="data")
    text_field: Optional[str] = arg(None, "train on this whole field (no prompt)", group="data")
    prompt_field: Optional[str] = arg(None, "prompt field (default: found from the known layouts)", group="data")
    answer_field: Optional[str] = arg(None, "answer field (default: found from the known layouts)", group="data")
    chat_template: bool = arg(False, "render prompt and answer with the tokenizer's chat template", group="data")
    prompt_template: Optional[str] = arg(
        None, "prompt text around {question} for non-chat data; default 'Question: {question}\\nAnswer:' (the "
        "format train_remedi.py and the evaluators use)", group="data")
    limit: Optional[int] = arg(None, _by_data("limit", "use at most this many records (embedded: problems "
                                              "generated)", "all", "all"), group="data")
    seq_len: Optional[int] = arg(None, _by_data("seq_len", "tokens per row (prompt + answer + EOS padding)",
                                                f"the model's window, at most {MAX_SEQ_LEN}",
                                                f"the model's window, at most {LLADA_MAX_SEQ_LEN} (the seeds' "
                                                "max_length; lower it for short data)"), group="data")
    epochs: Optional[float] = arg(None, f"passes over the data (ignored with --max_steps); default {EPOCHS:g}",
                                  group="schedule")
    max_steps: Optional[int] = arg(None, _by_data("max_steps", "optimizer steps", "from --epochs",
                                                  f"{LLADA_DEFAULTS['max_steps']} (the seeds') unless --epochs is "
                                                  "given"), group="schedule")
    eps: float = arg(1e-3, "p_mask = (1 - eps) t + eps", group="schedule")
    # the optimisation defaults of the shared configs, made data-dependent
    lr: Optional[float] = arg(None, _by_data("lr", "peak learning rate"), group="optimisation")
    min_lr: Optional[float] = arg(None, _by_data("min_lr", "final learning rate of the cosine decay"),
                                  group="optimisation")
    warmup_steps: Optional[int] = arg(None, _by_data("warmup_steps", "linear warmup steps, capped at max_steps"),
                                      group="optimisation")
    micro_batch_size: Optional[int] = arg(None, _by_data("micro_batch_size", "sequences per device per forward",
                                                         "by model size as upstream (32/16/8/4)"),
                                          group="optimisation")
    global_batch_size: Optional[int] = arg(None, _by_data("global_batch_size", "sequences per optimizer step over "
                                                          "all devices (gradient accumulation fills the gap)",
                                                          llada="micro_batch_size x devices"),
                                           group="optimisation")
    save_interval: Optional[int] = arg(None, _by_data("save_interval", "save a checkpoint every N optimizer steps "
                                                      "(and always after the last one)"), group="run")
    seed: Optional[int] = arg(None, _by_data("seed", "seeds model init, data order and noise"), group="run")
    out_dir: Path = arg(Path("out/train_sft"), "checkpoints iter-XXXXXX-ckpt.pth, logs/version_k/metrics.csv and "
                        "the final export", group="run")
    export_dir: Optional[Path] = arg(None, "folder of the final model, default <out_dir>/final: SMDM: model."
                                     "safetensors + smdm_config.json; LLaDA: a transformers folder; LLaDA with "
                                     "--lora_r: the PEFT adapter (generate.py --lora_path); each with the tokenizer",
                                     group="run")
    lora_r: Optional[int] = arg(None, "LLaDA: train a LoRA adapter of this rank on the frozen model instead of every "
                                "weight (default: full fine-tuning)", group="LoRA (LLaDA)")
    lora_alpha: Optional[int] = arg(None, "LoRA alpha; default 2 x --lora_r", group="LoRA (LLaDA)")
    lora_dropout: Optional[float] = arg(None, f"LoRA dropout; default {LORA_DEFAULTS['lora_dropout']}",
                                        group="LoRA (LLaDA)")
    lora_target: Optional[str] = arg(None, "'auto' (default: the attention and MLP projections of every block) or "
                                     "comma-separated module names, e.g. q_proj,v_proj", group="LoRA (LLaDA)")

    @property
    def embedded_data(self) -> bool:
        return self.dataset == "embedded"

    @property
    def llada(self) -> bool:
        """--model_name names a LLaDA model (folder or hub name), not an SMDM config."""
        return self.model_name is not None and self.model_name not in name_to_config

    @property
    def lora_flags(self) -> list[str]:
        return [f"--{name}" for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target")
                if getattr(self, name) is not None]

    def resolve_defaults(self) -> "SFTConfig":
        """Fill the defaults left None: the model (the shipped embedded backbone unless --model / --model_name), the
        tokenizer (the one a --pretrained_path folder ships), then LLADA_DEFAULTS for a LLaDA model, EMBEDDED_RECIPE
        on the embedded task, GENERAL_DEFAULTS otherwise. Idempotent."""
        if self.pretrained_path is None and self.model is None and self.model_name is None:
            self.pretrained_path = EMBEDDED_DIR
        folder = self.pretrained_path
        if self.tokenizer is None and folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
            self.tokenizer = str(folder)
        if self.llada:
            if self.lora_r is not None:
                fill_none(self, {**LORA_DEFAULTS, "lora_alpha": 2 * self.lora_r})
            fill_none(self, LLADA_DEFAULTS, keep_none=["max_steps"] if self.epochs is not None else [])
            self.epochs = EPOCHS if self.epochs is None else self.epochs
            if self.global_batch_size is None:
                self.global_batch_size = self.micro_batch_size * self.world_size
            return self
        self.epochs = EPOCHS if self.epochs is None else self.epochs
        return fill_none(self, EMBEDDED_RECIPE if self.embedded_data else GENERAL_DEFAULTS)

    def check_llada(self) -> None:
        """One-line errors for the flags of a LLaDA --model_name (or LoRA flags without one); reads no weights."""
        if not self.llada:
            if self.lora_flags:
                raise UserError(f"{', '.join(self.lora_flags)}: LoRA here trains a LLaDA --model_name (folder or hub "
                                "name); SMDM models train every weight: drop the LoRA flags")
            return
        given = [f"--{name}" for name in ("pretrained_path", "model", "vocab_size") if getattr(self, name) is not None]
        if given:
            raise UserError(f"--model_name {self.model_name} is a LLaDA model whose own weights and vocabulary are "
                            f"fine-tuned; drop {', '.join(given)}")
        if not is_hub_name(self.model_name) and not Path(self.model_name).expanduser().exists():
            raise FileNotFoundError(f"--model_name {self.model_name} is neither an SMDM config (e.g. Diff_LLaMA_170M, "
                                    "Diff_LLaMA_tiny) nor an existing LLaDA folder or a hub name org/name; fix it")
        source = self.model_name if is_hub_name(self.model_name) else Path(self.model_name).expanduser()
        kind = detect_kind(source).name
        if kind != "llada":
            fix = "pass it with --pretrained_path" if kind == "smdm" else "train it with its own trainer"
            raise UserError(f"--model_name {self.model_name} is a {kind} model, not a LLaDA one; {fix}")
        if self.lora_flags and self.lora_r is None:
            raise UserError(f"{', '.join(self.lora_flags)} shape a LoRA adapter: add --lora_r R (e.g. 16), or drop "
                            "them to fine-tune every weight")
        if self.lora_r is not None and (self.lora_r < 1 or self.lora_alpha < 1 or not 0 <= self.lora_dropout < 1):
            raise UserError(f"--lora_r and --lora_alpha must be >= 1 and --lora_dropout in [0, 1), got {self.lora_r}, "
                            f"{self.lora_alpha}, {self.lora_dropout}")

    def check(self) -> "SFTConfig":
        """UserError / FileNotFoundError naming the first bad flag and the fix; nothing is loaded. Resolves the
        defaults first (resolve_defaults)."""
        self.resolve_defaults()
        self.check_fabric(), self.check_run(), self.check_optim()
        self.check_llada()
        require_path(self.pretrained_path, "--pretrained_path")
        if self.tokenizer is None and not self.llada:
            where = f"{self.pretrained_path} ships none" if self.pretrained_path else "a random-init model has none"
            raise UserError(f"--tokenizer is required: {where}; pass the tokenizer folder the model was trained with")
        require_path(self.tokenizer, "--tokenizer", kind="model")
        if not self.embedded_data:
            require_path(self.dataset, "--dataset", kind="dataset")
        if self.seq_len is not None and self.seq_len < 2 or self.save_interval < 1 or not self.epochs > 0:
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
    parser = ArgumentParser(description=__doc__)
    return add_config_args(parser, SFTConfig)


def parse_args(argv: Optional[list[str]] = None) -> SFTConfig:
    return config_from_args(SFTConfig, build_parser().parse_args(argv)).check()


def model_config(cfg: SFTConfig) -> Config:
    """From the pretrained SMDM folder's smdm_config.json, else from --model / --model_name; a --seq_len left None
    becomes the model's window (at most MAX_SEQ_LEN)."""
    folder_config = cfg.pretrained_path is not None and (cfg.pretrained_path / CONFIG_FILE).is_file()
    if folder_config:
        if cfg.model is not None or cfg.model_name is not None or cfg.vocab_size is not None:
            raise UserError(f"{cfg.pretrained_path} is an SMDM folder whose {CONFIG_FILE} sets the model; "
                            "drop --model / --model_name / --vocab_size.")
        config = load_smdm_config(cfg.pretrained_path)
    else:
        config = smdm_config(cfg)
    cfg.seq_len = cfg.seq_len or min(MAX_SEQ_LEN, config.block_size)
    if cfg.seq_len > config.block_size:
        raise UserError(f"--seq_len {cfg.seq_len} exceeds the model's block_size {config.block_size}; lower it.")
    return config


def sft_noise(input_ids: torch.Tensor, prompt_len: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process with the prompt kept clean: (b, l) ids, (b,) prompt lengths, (b,) t, (b, l) u ->
    noisy, masked (answer positions only), p_mask."""
    maskable = answer_mask(prompt_len.to(input_ids.device), input_ids.shape[1])
    return forward_process(input_ids, t, u, mask_id, eps, maskable=maskable)


def llada_on_meta(cfg: SFTConfig) -> Backbone:
    """The LLaDA --model_name built from its config alone (no weights read) with its tokenizer; a --seq_len left None
    becomes its window (at most LLADA_MAX_SEQ_LEN). Refuses a dual-stream RemeDi and rows longer than the window."""
    meta = load_backbone(cfg.model_name, device="meta", tokenizer=cfg.tokenizer)
    if has_ups_stream(meta.model):
        raise UserError(f"--model_name {cfg.model_name} is a dual-stream RemeDi, whose UPS stream this SFT would not "
                        "train; fine-tune it with SMDM/pretrain/train_remedi.py, or pass its single-stream LLaDA")
    window = max_length_of(meta.model) or LLADA_MAX_SEQ_LEN
    cfg.seq_len = cfg.seq_len or min(LLADA_MAX_SEQ_LEN, window)
    if cfg.seq_len > window:
        raise UserError(f"--seq_len {cfg.seq_len} exceeds the context {window} of {cfg.model_name}; lower it.")
    return dataclasses.replace(meta, tokenizer=meta.tokenizer or load_tokenizer(cfg.model_name, "model"))


def load_llada(cfg: SFTConfig, fabric) -> tuple[torch.nn.Module, Backbone]:
    """(the model to train: the LLaDA in train mode, wrapped by PEFT with a new LoRA adapter when --lora_r, the
    loaded Backbone). Weights in float32 unless the precision is *-true in a lower one."""
    precision = cfg.precision or default_precision(cfg.accelerator)
    backbone = load_backbone(cfg.model_name, device=fabric.device, tokenizer=cfg.tokenizer,
                             dtype=PRECISION_DTYPES.get(precision, torch.float32))
    model = backbone.model.train()
    if cfg.lora_r is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          target_modules=resolve_lora_target(cfg.lora_target, backbone.kind, model))
        model = get_peft_model(model, lora)  # the base weights frozen, the adapter trainable
    return model, backbone


def setup_state(fabric, model: torch.nn.Module, cfg: SFTConfig, hparams: dict) -> dict:
    """setup_model_and_optimizer's checkpoint state; with LoRA the optimizer takes the adapter alone and checkpoints
    hold the adapter alone (its weights by name, LORA_KEY_SEP for the dots), or under FSDP the whole sharded model
    (whose full state dict Fabric gathers)."""
    if cfg.lora_r is None:
        return setup_model_and_optimizer(fabric, model, cfg, hparams)
    adapter = {name.replace(".", LORA_KEY_SEP): p for name, p in model.named_parameters() if p.requires_grad}
    wrapped = fabric.setup(model)
    optimizer = build_optimizer(fabric, [p for p in wrapped.parameters() if p.requires_grad], cfg)
    saved = wrapped if cfg.strategy == "fsdp" else torch.nn.ParameterDict(adapter)
    return {"model": saved, "trained": wrapped, "optimizer": optimizer, "hparams": hparams, "iter_num": 0,
            "step_count": 0}


def export_adapter(fabric, out_dir: Path, peft_model, tokenizer, export_dir: Path) -> None:
    """On rank 0, write the LoRA adapter of the newest checkpoint in `out_dir` (PEFT save_pretrained: what
    load_eval_model's lora_path and generate.py --lora_path read) with the tokenizer; the same after FSDP."""
    if fabric.global_rank == 0:
        saved = torch.load(latest_checkpoint(out_dir), map_location="cpu", weights_only=True, mmap=True)["model"]
        adapter = {k.replace(LORA_KEY_SEP, "."): v for k, v in saved.items() if "lora_" in k}
        require_finite(adapter, f"the adapter for {export_dir}", "Train again with a lower learning rate.")
        peft_model.save_pretrained(str(export_dir), state_dict=adapter)
        tokenizer.save_pretrained(str(export_dir))
        fabric.print(f"Exported the LoRA adapter to {export_dir}")
    fabric.barrier()


def smdm_tokenizer(cfg: SFTConfig, config: Config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                        f"{config.vocab_size} (its mask id); use the tokenizer the model was trained with, or "
                        "set --vocab_size.")
    return tokenizer


def main(argv: Optional[list[str]] = None) -> list[float]:
    """Train; returns the per-step losses of this run (on every rank)."""
    cfg = parse_args(argv)
    config = None if cfg.llada else model_config(cfg)
    meta = llada_on_meta(cfg) if cfg.llada else None
    if os.environ.get("LOCAL_RANK", "0") == "0":  # the first line, before the data is read (seconds to minutes)
        recipe = " with the embedded recipe" if cfg.embedded_data and not cfg.llada else ""
        what = (f"the LLaDA {cfg.model_name} ({f'LoRA r {cfg.lora_r}' if cfg.lora_r else 'every weight'})"
                if cfg.llada else cfg.pretrained_path or f"a random {config.name}")
        print(f"SFT of {what} on {cfg.dataset!r}{recipe}: reading {cfg.limit or 'all'} records, tokenizer "
              f"{cfg.tokenizer or cfg.model_name}", flush=True)
    if config is not None:
        cfg.micro_batch_size = cfg.micro_batch_size or default_micro_batch_size(num_non_embedding_params(config) / 1e6)
    G, L, micro = cfg.global_batch_size, cfg.seq_len, cfg.micro_batch_size
    grad_accum = grad_accum_steps(G, micro, cfg.world_size)
    export_dir = cfg.export_dir or cfg.out_dir / "final"
    with claim_outputs(cfg.out_dir, folders={"--export_dir": cfg.export_dir}):
        tokenizer = meta.tokenizer if meta is not None else smdm_tokenizer(cfg, config)
        records = load_records(cfg.dataset, cfg.split, cfg.subset, cfg.limit)
        fields = resolve_fields(column_names(records), cfg.text_field, cfg.prompt_field, cfg.answer_field)
        ex = build_sft_examples(records, tokenizer, cfg.seq_len, fields, cfg.chat_template, cfg.prompt_template)
        max_steps = cfg.max_steps or max(1, math.ceil(len(ex) * cfg.epochs / G))

        wrap = fsdp_block_classes(["llada"]) if cfg.llada and cfg.strategy == "fsdp" else None
        fabric = setup_fabric(cfg, wrap_blocks=wrap, loggers=[csv_logger(cfg.out_dir)])
        name = cfg.model_name if cfg.llada else config.name
        hparams = {**hparams_of(cfg), "model_name": name, "max_steps": max_steps,
                   **({} if cfg.llada else {"vocab_size": config.vocab_size})}
        fabric.print(f"{name}: {len(ex)} examples ({ex.dropped} dropped, {ex.truncated} cut), {max_steps} "
                     f"steps of {G} x {L} tokens, {grad_accum} micro-batches of {micro} per device per step",
                     flush=True)

        fabric.seed_everything(cfg.seed)  # before the model: a random init and a new adapter come from --seed
        if cfg.llada:
            model, backbone = load_llada(cfg, fabric)
            mask_id = backbone.mask_id
            fabric.print(f"Loaded {cfg.model_name}")
        else:
            with fabric.init_module():
                model = TransEncoder(config)
            if cfg.pretrained_path is not None:
                load_weights(model, cfg.pretrained_path)
                fabric.print(f"Loaded weights from {cfg.pretrained_path}")
            mask_id = config.mask_id
        fabric.print(f"Total parameters {num_parameters(model):,} ({num_parameters(model, trainable=True):,} "
                     "trainable)")
        peft_model = model if cfg.lora_r is not None else None
        apply_gradient_checkpointing(model, cfg)
        state = setup_state(fabric, model, cfg, hparams)
        model = state.pop("trained", state["model"])
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
            noisy, masked, p_mask = sft_noise(tokens, ex.prompt_len[idx], draw.t[rows], draw.u[rows], mask_id,
                                              cfg.eps)
            logits = logits_of(model(noisy))  # (micro, L, V)
            return tps_loss(logits, tokens, masked, p_mask, ex.answer_len[idx].to(fabric.device)), {}

        schedule = Schedule(max_steps=max_steps, warmup_steps=warmup_for(max_steps, cfg.warmup_steps),
                            grad_accum=grad_accum, grad_clip=cfg.grad_clip, save_interval=cfg.save_interval,
                            divergence_factor=cfg.divergence_factor)
        group = TrainGroup(model, state["optimizer"], lr=cfg.lr, min_lr=cfg.min_lr)
        result = fit(fabric, state, step_fn, [group], schedule, cfg.out_dir,
                     resume=resume_path(cfg.out_dir, cfg.resume), hparams=hparams)
        if peft_model is not None:
            export_adapter(fabric, cfg.out_dir, peft_model, tokenizer, export_dir)
        elif cfg.llada:
            export_model(fabric, cfg.out_dir, backbone, export_dir)
            fabric.print(f"Exported the model to {export_dir}")
        else:
            export_smdm(fabric, cfg.out_dir, config, export_dir, tokenizer)  # the export loads on its own
    return result.losses


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_main(main)
