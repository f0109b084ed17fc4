"""Remask SFT (RemeDi): config, step function and setup; the loop is lit_gpt.training.fit.

    from remedi_patches.remask_sft import RemaskConfig, run
    summary = run(RemaskConfig())        # the embedded backbone and task with the demo's recipe (EMBEDDED_RECIPE)
    summary = run(RemaskConfig(model_name="GSAI-ML/LLaDA-8B-Base", dataset="data/gsm8k", seq_len=1024, batch_size=1))

Defaults that depend on the model (None in the dataclass, resolved by check()): with the embedded backbone
(--model_name embedded, the default) the recipe the demo trains with, EMBEDDED_RECIPE (seq_len 72 on the embedded
task); with any other backbone the general defaults, GENERAL_DEFAULTS (the seeds' LLaDA settings).

Per sequence (prompt never noised): t ~ U(eps, 1); answer tokens masked with rho_mask(t) = t; unmasked answer
tokens replaced by a different token with rho_incorrect(t) = 4 r t (1 - t), drawn uniformly from the vocabulary
(--incorrect_source uniform), sampled from the backbone's own TPS distribution at that position, truth excluded
(tps: one extra no-grad forward with the masked and the to-be-corrupted positions as [MASK]), or drawn from the
tokens of the global batch's x_t, truth excluded (context, the paper's). Loss = TPS (CE on masked positions /
p_mask, normalised by answer length) + lambda_ups * UPS (BCE over all answer positions; labels 1 clean, 0 incorrect,
stop-gradient p(true token) where masked, smoothed to 1 - eps / eps / eps + (1 - 2 eps) p by --label_smoothing eps).
The maths lives in remedi_patches.noise / .losses.

Modes (--train_mode):
  ups_only     backbone frozen and run under torch.no_grad; only the head trains (--lr).
  joint        LoRA on the backbone trained by the TPS loss (--lr_lora), the head by the UPS loss (--lr_ups) on
               detached hidden states, so the UPS loss never reaches the backbone. One update moves both.
  alternating  --alt_ratio TPS (LoRA) updates, then one UPS (head) update, repeated.

Determinism: the samples and the noise of optimizer step s come from generators seeded by (--seed, s) for
the whole global batch (batch_size x devices x grad_accum), each rank / micro-batch takes its slice (tps incorrect
tokens: a generator seeded by (--seed, s, slice)), so a killed run resumed from its newest checkpoint (--out_dir)
continues the same trajectory. The held-out AUC is remedi_patches.detection.measure_detection, the measurement
of the detection report.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.diffusion import seeded_generator
from lit_gpt.training import (FabricConfig, RunConfig, Schedule, TrainGroup, claim_outputs, csv_logger,
                              default_precision, fit, hparams_of, num_parameters, require_finite, require_path,
                              resume_path, setup_fabric)
from remedi_patches import data as sft_data
from remedi_patches.backbones import backbone_kind, fsdp_block_classes, load_backbone, max_length_of
from remedi_patches.cli import UserError, arg, fill_none, recipe_help
from remedi_patches.detection import DetectionSettings, measure_detection
from remedi_patches.losses import RemaskLosses, remask_losses
from remedi_patches.modeling_wrappers import (backbone_forward, check_head_fits, hidden_size_of, load_ups_head,
                                              save_ups_head)
from remedi_patches.noise import (INCORRECT_SOURCES, RemaskBatch, apply_remask_noise, check_noise_settings,
                                  context_incorrect_noise, noise_special_ids, tps_incorrect_noise)
from remedi_patches.ups_head import UPSHead

TRAIN_MODES = ("ups_only", "joint", "alternating")
# defaults resolved by RemaskConfig.check(): the embedded recipe is the demo's (held-out AUC ~0.9 in 100 updates)
EMBEDDED_RECIPE = {"seq_len": 72, "batch_size": 32, "max_steps": 400, "lr": 3e-3, "warmup_steps": 20,
                   "ups_width": 128, "eval_samples": 256}
GENERAL_DEFAULTS = {"seq_len": 128, "batch_size": 8, "max_steps": 0, "lr": 1e-4, "warmup_steps": 0,
                    "ups_width": None, "eval_samples": 64}


def _by_model(name: str, what: str = "") -> str:
    """Help text of a model-dependent default."""
    general = "0, or the loaded head's" if name == "ups_width" else GENERAL_DEFAULTS[name]
    when = "with the embedded model (the demo's recipe)" if what else "with the embedded model"
    return recipe_help(what, EMBEDDED_RECIPE[name], when, general)
STREAM_ORDER, STREAM_NOISE, STREAM_EVAL, STREAM_PROPOSE = 10, 11, 12, 13
PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


@dataclass
class RemaskConfig(FabricConfig, RunConfig):
    # backbone
    model_name: str = arg("embedded", "'embedded' (the shipped tiny model), a LLaDA folder or hub name, an SMDM "
                          "export folder, or an SMDM iter-*-ckpt.pth (then --smdm_size and --tokenizer)",
                          group="backbone")
    smdm_size: Optional[str] = arg(None, "SMDM config of a .pth checkpoint: Diff_LLaMA_170M or just 170",
                                   group="backbone")
    tokenizer: Optional[str] = arg(None, "tokenizer folder or hub name when the model has none", group="backbone")
    mask_id: Optional[int] = arg(None, "[MASK] token id; default: the backbone's (126336 for LLaDA, vocab size for "
                                 "SMDM)", group="backbone")
    # data
    dataset: str = arg("embedded", "'embedded', a local .json/.jsonl/.parquet file or folder, or a hub name",
                       group="data")
    split: str = arg("train", "split to train on", group="data")
    subset: Optional[str] = arg(None, "dataset config / sub-folder, e.g. educational_instruct", group="data")
    text_field: Optional[str] = arg(None, "train on this whole field as the answer (no prompt)", group="data")
    prompt_field: Optional[str] = arg(None, "prompt field; None: auto-detected", group="data")
    answer_field: Optional[str] = arg(None, "answer field; None: auto-detected", group="data")
    thinking_field: Optional[str] = arg(None, "with --attempt_field: answer = 'Thinking: <thinking>\\n\\nAttempt: "
                                        "<attempt>' (s1K)", group="data")
    attempt_field: Optional[str] = arg(None, "see --thinking_field", group="data")
    chat_template: bool = arg(False, "render prompt and answer with the tokenizer's chat template (instruct models)",
                              group="data")
    prompt_template: Optional[str] = arg(None, "prompt text around {question} for non-chat data (as in "
                                         "eval_gsm_math.py); default: 'Question: {question}\\nAnswer:', the embedded "
                                         "task's and the evaluators' format", group="data")
    max_records: Optional[int] = arg(None, "use at most this many records (embedded: problems generated; default "
                                     "4000)", group="data")
    seq_len: Optional[int] = arg(None, _by_model("seq_len", "tokens per row: prompt + answer + EOS padding") +
                                 " (72 only on the embedded task)", group="data")
    # optimisation
    batch_size: Optional[int] = arg(None, _by_model("batch_size", "sequences per device per micro-batch"),
                                    group="optimisation")
    grad_accum: int = arg(1, "micro-batches per optimizer update", group="optimisation")
    epochs: int = arg(1, "passes over the data (unless --max_steps)", group="optimisation")
    max_steps: Optional[int] = arg(None, _by_model("max_steps", "optimizer updates; 0: from --epochs"),
                                   group="optimisation")
    lr: Optional[float] = arg(None, _by_model("lr", "peak learning rate of the UPS head"), group="optimisation")
    lr_ups: Optional[float] = arg(None, "head learning rate in joint/alternating; default --lr", group="optimisation")
    lr_lora: float = arg(5e-5, "peak learning rate of the LoRA weights", group="optimisation")
    min_lr_ratio: float = arg(0.1, "cosine decay ends at ratio x peak", group="optimisation")
    warmup_steps: Optional[int] = arg(None, _by_model("warmup_steps", "linear warmup updates"),
                                      group="optimisation")
    weight_decay: float = arg(0.0, "AdamW weight decay", group="optimisation")
    grad_clip: float = arg(1.0, "gradient-norm clip (0 disables)", group="optimisation")
    # Remask SFT
    lambda_ups: float = arg(1.0, "total = TPS + lambda_ups * UPS", group="remask SFT")
    r_incorrect: float = arg(0.1, "rho_incorrect(t) = 4 r t (1 - t)", group="remask SFT")
    incorrect_source: str = arg("uniform", "incorrect tokens: 'uniform' over the non-special vocabulary; 'tps': "
                                "sampled from the backbone's TPS at that position, truth excluded (the sampler's "
                                "plausible mistakes); 'context' (the paper's): drawn from the tokens of the batch's "
                                "x_t, truth excluded", choices=INCORRECT_SOURCES, group="remask SFT")
    label_smoothing: float = arg(0.0, "UPS labels eps: 1 - eps correct, eps incorrect, eps + (1 - 2 eps) p_TPS "
                                 "masked (the paper uses 0.05)", group="remask SFT")
    eps: float = arg(1e-3, "t ~ U(eps, 1)", group="remask SFT")
    train_mode: str = arg("ups_only", "ups_only: head only, backbone frozen; joint: LoRA by TPS + head by UPS in "
                          "every update; alternating: --alt_ratio LoRA updates then one head update",
                          choices=TRAIN_MODES, group="remask SFT")
    alt_ratio: int = arg(1, "alternating: TPS updates per UPS update", group="remask SFT")
    # UPS head
    ups_width: Optional[int] = arg(None, "hidden width of a new head (0: one Linear); default 128 with the embedded "
                                   "model (the demo's recipe), else 0; with --load_ups_head the loaded head's",
                                   group="UPS head")
    load_ups_head: Optional[str] = arg(None, "continue training this saved head", group="UPS head")
    save_path: Optional[str] = arg(None, "where the trained head goes (safetensors); default "
                                   "<out_dir>/ups_head.safetensors", flags=("--save_path", "--save_ups_head"),
                                   group="UPS head")
    # LoRA
    lora_r: int = arg(16, "LoRA rank", group="LoRA (joint / alternating)")
    lora_alpha: int = arg(32, "LoRA alpha", group="LoRA (joint / alternating)")
    lora_dropout: float = arg(0.05, "LoRA dropout", group="LoRA (joint / alternating)")
    lora_target: str = arg("auto", "'auto' (every block's linear layers) or comma-separated module names, e.g. "
                           "q_proj,v_proj", group="LoRA (joint / alternating)")
    load_lora_dir: Optional[str] = arg(None, "continue from this adapter (in ups_only it is applied to the frozen "
                                       "backbone)", group="LoRA (joint / alternating)")
    save_lora_dir: Optional[str] = arg(None, "where the adapter goes; default <out_dir>/lora",
                                       group="LoRA (joint / alternating)")
    # evaluation, checkpoints
    eval_split: Optional[str] = arg(None, "held-out split for the detection AUC; default: --eval_samples records "
                                    "held out of --split", group="evaluation and checkpoints")
    eval_samples: Optional[int] = arg(None, _by_model("eval_samples", "held-out sequences (0: no evaluation)"),
                                      group="evaluation and checkpoints")
    eval_every: int = arg(100, "evaluate every N updates (0: only at the end)", group="evaluation and checkpoints")
    save_every: int = arg(100, "resumable checkpoint every N updates (and after the last)",
                          group="evaluation and checkpoints")
    out_dir: str = arg("out/remedi", "checkpoints, logs/version_k/metrics.csv, head, adapter",
                       group="evaluation and checkpoints")
    seed: int = arg(1337, "seeds the head, LoRA, data order and noise", group="evaluation and checkpoints")

    @property
    def lora_trained(self) -> bool:
        return self.train_mode != "ups_only"

    @property
    def head_path(self) -> Path:
        return Path(self.save_path) if self.save_path else Path(self.out_dir) / "ups_head.safetensors"

    @property
    def lora_dir(self) -> Optional[Path]:
        if not self.lora_trained:
            return None
        return Path(self.save_lora_dir) if self.save_lora_dir else Path(self.out_dir) / "lora"

    @property
    def embedded_model(self) -> bool:
        return self.model_name == "embedded"

    def resolve_defaults(self) -> "RemaskConfig":
        """Fill the model-dependent defaults left None: EMBEDDED_RECIPE for the embedded backbone (seq_len 72 only
        on the embedded task: other data gets the model's 128), GENERAL_DEFAULTS otherwise. Idempotent."""
        recipe = dict(EMBEDDED_RECIPE if self.embedded_model else GENERAL_DEFAULTS)
        if self.dataset != "embedded":
            recipe["seq_len"] = GENERAL_DEFAULTS["seq_len"]
        keep_none = ["ups_width"] if self.load_ups_head is not None else []  # the loaded head's width
        return fill_none(self, recipe, keep_none)

    def check(self) -> "RemaskConfig":
        """UserError / FileNotFoundError naming the first bad flag and the fix. Reads no model or data.
        Resolves the model-dependent defaults first (resolve_defaults)."""
        self.resolve_defaults()
        self.check_fabric(), self.check_run()
        positive = {"seq_len": self.seq_len, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "epochs": self.epochs, "alt_ratio": self.alt_ratio, "lora_r": self.lora_r}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"--{name} must be >= 1, got {value}")
        for name in ("max_steps", "eval_samples", "eval_every", "warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "lr_lora", "lr_ups"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                raise UserError(f"--{name} must be a positive number, got {value}")
        if self.train_mode not in TRAIN_MODES:
            raise UserError(f"--train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
        check_noise_settings(self.r_incorrect, self.incorrect_source, self.eps)
        if self.lambda_ups < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError("--lambda_ups must be >= 0 and --min_lr_ratio in [0, 1]")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5) (labels eps and 1 - eps), got "
                            f"{self.label_smoothing}; the paper uses 0.05")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise UserError("--weight_decay and --grad_clip must be >= 0 and --lora_dropout in [0, 1)")
        if self.ups_width is not None and self.ups_width < 0:
            raise UserError(f"--ups_width must be >= 0, got {self.ups_width}")
        if self.max_records is not None and self.max_records < 1:
            raise UserError(f"--max_records must be >= 1, got {self.max_records}")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise UserError(f"--prompt_template {self.prompt_template!r} has no {{question}} placeholder; add one")
        if self.smdm_size is not None and not self.smdm_size.startswith("Diff_LLaMA_"):
            self.smdm_size = f"Diff_LLaMA_{self.smdm_size}M" if self.smdm_size.isdigit() else self.smdm_size
        if self.model_name != "embedded":
            require_path(self.model_name, "--model_name", kind="model")
        require_path(self.tokenizer, "--tokenizer", kind="model")
        if self.dataset != "embedded":
            require_path(self.dataset, "--dataset", kind="dataset")
        require_path(self.load_ups_head, "--load_ups_head")
        if self.load_lora_dir is not None and not (Path(self.load_lora_dir) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--load_lora_dir {self.load_lora_dir}: no LoRA adapter there "
                                    "(adapter_config.json missing); pass the folder written by --save_lora_dir")
        return self


def check_config(cfg: RemaskConfig) -> RemaskConfig:
    return cfg.check()


# ---------------------------------------------------------------- pure helpers


def step_kind(mode: str, step: int, alt_ratio: int) -> str:
    """What optimizer update `step` (0-based) trains: 'ups' (head), 'tps' (LoRA) or 'joint' (both)."""
    if mode == "ups_only":
        return "ups"
    if mode == "joint":
        return "joint"
    return "ups" if step % (alt_ratio + 1) == alt_ratio else "tps"


def update_counts(mode: str, steps: int, alt_ratio: int) -> tuple[int, int]:
    """(TPS updates, UPS updates) made by optimizer steps 0 .. steps - 1."""
    if mode == "ups_only":
        return 0, steps
    if mode == "joint":
        return steps, steps
    ups = steps // (alt_ratio + 1)  # step s is a UPS update when s % (alt_ratio + 1) == alt_ratio
    return steps - ups, ups


def sample_indices(seed: int, n: int, start: int, count: int) -> list[int]:
    """Indices of samples start .. start+count-1 of the training stream: a fresh permutation of n per epoch."""
    out = []
    for k in range(start, start + count):
        epoch, pos = divmod(k, n)
        out.append(int(_epoch_order(seed, n, epoch)[pos]))
    return out


@lru_cache(maxsize=4)
def _epoch_order(seed: int, n: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=seeded_generator(seed, STREAM_ORDER, epoch))


def resolve_lora_target(spec: str, kind: str, model: torch.nn.Module):
    """PEFT target_modules for --lora_target: the backbone kind's auto regex, or a list of module names."""
    target = backbone_kind(kind).lora_targets if spec == "auto" else [s.strip() for s in spec.split(",") if s.strip()]
    names = [n for n, _ in model.named_modules()]
    if isinstance(target, str):
        hit = any(re.fullmatch(target, n) for n in names)
    else:
        hit = any(n == t or n.endswith("." + t) for n in names for t in target)
    if not hit:
        raise UserError(f"--lora_target {spec!r} matches no module of the {kind} backbone; pass module names "
                        f"such as {sorted({n.rsplit('.', 1)[-1] for n in names if n})[:12]}")
    return target


def propose_incorrect(model, input_ids, batch: RemaskBatch, mask_id: int, vocab_size: int, special: list[int],
                      generator: torch.Generator) -> RemaskBatch:
    """--incorrect_source tps: `batch` with its incorrect tokens sampled from the backbone, run in eval mode and
    without grad as the sampler runs it (same t, masked and incorrect sets)."""
    was_training = model.training
    model.eval()
    try:
        return tps_incorrect_noise(lambda x: backbone_forward(model, x)[0], input_ids, batch, mask_id, vocab_size,
                                   special, generator)
    finally:
        model.train(was_training)


def remask_forward(model, head, batch: RemaskBatch, input_ids, answer_mask, answer_len, kind: str,
                   lambda_ups: float, label_smoothing: float = 0.0) -> tuple[RemaskLosses, torch.Tensor]:
    """One forward of backbone + head on a noised batch -> (losses, UPS logits (B, L)).

    kind: 'joint' | 'tps' | 'ups' (see step_kind) or 'eval' (no autograd at all). The backbone runs with
    autograd only when the TPS trains ('joint', 'tps'); the head always reads DETACHED hidden states, so the
    UPS loss can never reach the backbone; in a 'tps' update the head runs without grad.
    """
    with torch.set_grad_enabled(kind in ("joint", "tps")):
        logits, hidden = backbone_forward(model, batch.noisy, None, need_hidden=True)  # (B, L, V), (B, L, d)
    with torch.set_grad_enabled(kind in ("joint", "ups")):
        ups_logits = head(hidden.detach())  # (B, L)
    losses = remask_losses(logits, ups_logits, input_ids, batch.noisy, batch.masked, batch.incorrect, batch.p_mask,
                           answer_mask, answer_len, lambda_ups, label_smoothing)
    return losses, ups_logits


# ---------------------------------------------------------------- setup


def load_split_records(cfg: RemaskConfig) -> tuple:
    """(training records, records of --eval_split or None), with their fields checked: read before any model
    loads, so that a broken data file is reported at once."""
    def load(split: str, limit: Optional[int]):
        records = sft_data.load_records(cfg.dataset, split, cfg.subset, limit=limit)
        sft_data.resolve_fields(sft_data.column_names(records), cfg.text_field, cfg.prompt_field, cfg.answer_field,
                                cfg.thinking_field, cfg.attempt_field)
        return records

    held = load(cfg.eval_split, cfg.eval_samples) if cfg.eval_samples and cfg.eval_split is not None else None
    return load(cfg.split, cfg.max_records), held


def _examples(cfg: RemaskConfig, tokenizer, records) -> sft_data.SFTExamples:
    fields = sft_data.resolve_fields(sft_data.column_names(records), cfg.text_field, cfg.prompt_field,
                                     cfg.answer_field, cfg.thinking_field, cfg.attempt_field)
    return sft_data.build_sft_examples(records, tokenizer, cfg.seq_len, fields, cfg.chat_template,
                                       cfg.prompt_template)


def split_train_eval(cfg: RemaskConfig, tokenizer, records: tuple):
    """(train examples, held-out examples or None) from load_split_records' records."""
    train_records, held_records = records
    train = _examples(cfg, tokenizer, train_records)
    if cfg.eval_samples == 0:
        return train, None
    if held_records is not None:
        return train, _examples(cfg, tokenizer, held_records)
    if len(train) <= cfg.eval_samples:
        raise UserError(f"{len(train)} training examples cannot spare --eval_samples {cfg.eval_samples} for "
                        "evaluation; lower --eval_samples or pass --eval_split")
    order = torch.randperm(len(train), generator=seeded_generator(cfg.seed, STREAM_EVAL))
    keep, held = order[cfg.eval_samples:].sort().values, order[:cfg.eval_samples].sort().values
    return _rows(train, keep), _rows(train, held)


def _rows(ex: sft_data.SFTExamples, idx: torch.Tensor) -> sft_data.SFTExamples:
    return dataclasses.replace(ex, input_ids=ex.input_ids[idx], prompt_len=ex.prompt_len[idx],
                               answer_len=ex.answer_len[idx])


def add_lora(cfg: RemaskConfig, model, kind: str, trainable: bool):
    """Inject LoRA into `model` in place (new adapter or --load_lora_dir); returns the PEFT wrapper."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.load_lora_dir is not None:
        return PeftModel.from_pretrained(model, cfg.load_lora_dir, is_trainable=trainable)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=resolve_lora_target(cfg.lora_target, kind, model), bias="none")
    return get_peft_model(model, lora)


def build_head(cfg: RemaskConfig, model) -> UPSHead:
    """A new head of --ups_width on the backbone's hidden size, or the --load_ups_head one (checked to fit)."""
    if cfg.load_ups_head is None:
        return UPSHead(hidden_size_of(model), cfg.ups_width or 0)
    head, _ = load_ups_head(cfg.load_ups_head)
    check_head_fits(head, model)
    if cfg.ups_width is not None and cfg.ups_width != head.width:
        raise UserError(f"--ups_width {cfg.ups_width} differs from the loaded head's width {head.width}; drop "
                        "--ups_width to continue training the loaded head")
    return head.train()


class RemaskStep:
    """The Remask SFT step function for lit_gpt.training.fit: `self(step, micro) -> (loss, metrics)` and
    `self.groups(step)` (head and / or LoRA, by step_kind)."""

    def __init__(self, fabric, cfg: RemaskConfig, model, head, examples: sft_data.SFTExamples, mask_id: int,
                 vocab_size: int, special: list[int], head_group: TrainGroup, lora_group: Optional[TrainGroup]):
        self.fabric, self.cfg, self.model, self.head, self.ex = fabric, cfg, model, head, examples
        self.mask_id, self.vocab_size, self.special = mask_id, vocab_size, special
        self.head_group, self.lora_group = head_group, lora_group
        self.global_batch = cfg.batch_size * fabric.world_size * cfg.grad_accum

    def groups(self, step: int) -> list[TrainGroup]:
        kind = step_kind(self.cfg.train_mode, step, self.cfg.alt_ratio)
        return ([self.head_group] if kind in ("joint", "ups") else []) + \
               ([self.lora_group] if kind in ("joint", "tps") else [])

    @lru_cache(maxsize=1)
    def plan(self, step: int):
        """Clean rows and their noise for the whole global batch of update `step` (CPU, same on every rank)."""
        cfg, ex = self.cfg, self.ex
        idx = sample_indices(cfg.seed, len(ex), step * self.global_batch, self.global_batch)
        ids, plen, alen = ex.input_ids[idx], ex.prompt_len[idx], ex.answer_len[idx]
        amask = sft_data.answer_mask(plen, cfg.seq_len)
        generator = seeded_generator(cfg.seed, STREAM_NOISE, step)
        noise = apply_remask_noise(ids, amask, self.mask_id, cfg.r_incorrect, self.vocab_size, self.special,
                                   generator=generator, eps=cfg.eps)
        if cfg.incorrect_source == "context":  # the pool is the whole global batch's x_t, the same on every rank
            noise = context_incorrect_noise(ids, noise, self.mask_id, self.vocab_size, self.special, generator)
        return ids, amask, alen, noise

    def __call__(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        cfg, fabric = self.cfg, self.fabric
        ids, amask, alen, noise = self.plan(step)
        part = micro * fabric.world_size + fabric.global_rank
        rows = slice(part * cfg.batch_size, (part + 1) * cfg.batch_size)
        to = lambda x: x[rows].to(fabric.device)  # noqa: E731
        ids, amask, alen, noise = to(ids), to(amask), to(alen), RemaskBatch(*(to(x) for x in noise))
        kind = step_kind(cfg.train_mode, step, cfg.alt_ratio)
        with fabric.autocast():
            if cfg.incorrect_source == "tps":
                noise = propose_incorrect(self.model, ids, noise, self.mask_id, self.vocab_size, self.special,
                                          seeded_generator(cfg.seed, STREAM_PROPOSE, step, part))
            losses, _ = remask_forward(self.model, self.head, noise, ids, amask, alen, kind, cfg.lambda_ups,
                                       cfg.label_smoothing)
        n_answer = amask.sum().clamp(min=1)
        tps_updates, ups_updates = update_counts(cfg.train_mode, step + 1, cfg.alt_ratio)
        metrics = {"loss": losses.total.detach(), "tps_loss": losses.tps.detach(), "ups_loss": losses.ups.detach(),
                   "mask_frac": noise.masked.sum() / n_answer, "incorrect_frac": noise.incorrect.sum() / n_answer,
                   "tps_update": int(kind in ("joint", "tps")), "ups_update": int(kind in ("joint", "ups")),
                   "tps_updates": tps_updates, "ups_updates": ups_updates}
        return (losses.tps if kind == "tps" else losses.total), metrics


def _wrap_blocks(cfg: RemaskConfig) -> Optional[set[type]]:
    return fsdp_block_classes() if cfg.strategy == "fsdp" else None


# ---------------------------------------------------------------- the trainer


def run(cfg: RemaskConfig, backbone=None) -> dict:
    """Train as configured; returns the final metrics (same on every rank) with "losses" per update.
    `backbone`: a loaded remedi_patches.backbones.Backbone to use instead of loading --model_name."""
    cfg.check()
    out_dir = Path(cfg.out_dir)
    with claim_outputs(out_dir, files={"--save_path": cfg.head_path}, folders={"--save_lora_dir": cfg.lora_dir}):
        return _run(cfg, backbone, out_dir)


def _run(cfg: RemaskConfig, backbone, out_dir: Path) -> dict:
    records = load_split_records(cfg)
    fabric = setup_fabric(cfg, wrap_blocks=_wrap_blocks(cfg), loggers=[csv_logger(out_dir)])
    precision = cfg.precision or default_precision(cfg.accelerator)
    if backbone is None:
        name = None if cfg.model_name == "embedded" else cfg.model_name
        backbone = load_backbone(name, device=fabric.device, dtype=PRECISION_DTYPES.get(precision),
                                 smdm_size=cfg.smdm_size, tokenizer=cfg.tokenizer)
    model, tokenizer = backbone.model.to(fabric.device), backbone.tokenizer
    mask_id = backbone.mask_id if cfg.mask_id is None else cfg.mask_id
    limit = max_length_of(model)
    if limit is not None and cfg.seq_len > limit:
        raise UserError(f"--seq_len {cfg.seq_len} exceeds the backbone's context of {limit} tokens; lower it")
    vocab_size = len(tokenizer)
    special = noise_special_ids(tokenizer, mask_id, backbone.eos_id, backbone.eot_id)

    train_ex, eval_ex = split_train_eval(cfg, tokenizer, records)
    global_batch = cfg.batch_size * fabric.world_size * cfg.grad_accum
    max_steps = cfg.max_steps or cfg.epochs * max(1, len(train_ex) // global_batch)

    fabric.seed_everything(cfg.seed)
    model.requires_grad_(False)
    peft_model = None
    if cfg.lora_trained or cfg.load_lora_dir is not None:
        peft_model = add_lora(cfg, model, backbone.kind, trainable=cfg.lora_trained)
    model.train(cfg.lora_trained)
    raw_head = build_head(cfg, model)
    fabric.print(f"Remask SFT ({cfg.train_mode}) on {backbone.name}: {num_parameters(model):,} backbone parameters "
                 f"({num_parameters(model, trainable=True):,} trainable), head {num_parameters(raw_head):,}; "
                 f"{len(train_ex)} train / {0 if eval_ex is None else len(eval_ex)} held-out rows of {cfg.seq_len} "
                 f"tokens, {max_steps} updates of {global_batch} sequences")

    lr_head = cfg.lr if cfg.train_mode == "ups_only" else (cfg.lr_ups or cfg.lr)
    head = fabric.setup_module(raw_head)
    opt_head = fabric.setup_optimizers(torch.optim.AdamW(head.parameters(), lr=lr_head, weight_decay=cfg.weight_decay))
    hparams = hparams_of(cfg)
    state = {"head": head, "opt_head": opt_head, "step_count": 0, "iter_num": 0, "hparams": hparams}
    head_flag = "--lr" if cfg.train_mode == "ups_only" or cfg.lr_ups is None else "--lr_ups"
    head_group = TrainGroup(head, opt_head, lr=lr_head, min_lr=lr_head * cfg.min_lr_ratio, name="ups", flag=head_flag)
    lora_group = None
    if cfg.lora_trained:
        model = fabric.setup_module(model)
        lora_params = [p for p in model.parameters() if p.requires_grad]
        opt_lora = fabric.setup_optimizers(torch.optim.AdamW(lora_params, lr=cfg.lr_lora,
                                                             weight_decay=cfg.weight_decay))
        # checkpoints hold the LoRA weights only (the frozen base comes from --model_name); FSDP shards the
        # parameters, so there the wrapped module is saved whole
        lora_state = model if cfg.strategy == "fsdp" else torch.nn.ParameterList(lora_params)
        state.update(lora=lora_state, opt_lora=opt_lora)
        lora_group = TrainGroup(model, opt_lora, lr=cfg.lr_lora, min_lr=cfg.lr_lora * cfg.min_lr_ratio, name="lora",
                                flag="--lr_lora")

    step = RemaskStep(fabric, cfg, model, head, train_ex, mask_id, vocab_size, special, head_group, lora_group)
    settings = DetectionSettings(r_incorrect=cfg.r_incorrect, incorrect_source=cfg.incorrect_source, eps=cfg.eps,
                                 seed=cfg.seed, batch_size=cfg.batch_size)

    def evaluate() -> dict:
        return measure_detection(model, head, eval_ex, mask_id=mask_id, vocab_size=vocab_size, special_ids=special,
                                 settings=settings, autocast=fabric.autocast, device=fabric.device).metrics()

    schedule = Schedule(max_steps=max_steps, warmup_steps=cfg.warmup_steps, grad_accum=cfg.grad_accum,
                        grad_clip=cfg.grad_clip, save_interval=cfg.save_every, eval_interval=cfg.eval_every,
                        divergence_factor=cfg.divergence_factor)
    result = fit(fabric, state, step, step.groups, schedule, out_dir, evaluate if eval_ex is not None else None,
                 resume=resume_path(out_dir, cfg.resume), hparams=hparams)

    tps_updates, ups_updates = update_counts(cfg.train_mode, state["step_count"], cfg.alt_ratio)
    head_path, lora_dir = cfg.head_path, cfg.lora_dir
    if fabric.global_rank == 0:
        fix = "Train again with a lower learning rate."
        require_finite(raw_head, f"the UPS head for {head_path}", fix)
        if lora_dir is not None:
            require_finite([p for n, p in peft_model.named_parameters() if "lora_" in n], f"the adapter for {lora_dir}",
                           fix)
        meta = {"mask_id": mask_id, "backbone": backbone.name, "backbone_kind": backbone.kind,
                "prompt_template": None if cfg.chat_template else (cfg.prompt_template or
                                                                    sft_data.render_prompt("{question}")),
                "train_args": hparams, "updates": state["step_count"], **result.evaluation}
        save_ups_head(head_path, raw_head, meta)
        if lora_dir is not None:
            peft_model.save_pretrained(str(lora_dir))
        fabric.print(f"UPS head -> {head_path}" + (f", LoRA adapter -> {lora_dir}" if lora_dir else ""))
    fabric.barrier()
    summary = {"updates": state["step_count"], "tps_updates": tps_updates, "ups_updates": ups_updates,
               "head_path": str(head_path), "lora_dir": None if lora_dir is None else str(lora_dir),
               "metrics_csv": str(Path(fabric.logger.log_dir) / "metrics.csv"), **result.evaluation}
    fabric.print(json.dumps({k: None if v != v else v for k, v in summary.items()}, indent=2))  # NaN AUC -> null
    return {**summary, "losses": result.losses}
