"""Remask SFT (RemeDi): config, step function and setup; the loop is lit_gpt.training.fit.

    from remedi_patches.remask_sft import RemaskConfig, run
    summary = run(RemaskConfig())        # the embedded backbone and task with the demo's recipe (EMBEDDED_RECIPE)
    summary = run(RemaskConfig(model_name="GSAI-ML/LLaDA-8B-Base", dataset="data/gsm8k", seq_len=1024, batch_size=1))
    summary = run(RemaskConfig(add_ups_stream=True, recipe="paper"))   # the embedded RemeDi, the paper's recipe

Defaults that depend on the model (None in the dataclass, resolved by check()): with the embedded backbone
(--model_name embedded, the default) the recipe the demo trains with, EMBEDDED_RECIPE (seq_len 72 on the embedded
task); with any other backbone the general defaults, GENERAL_DEFAULTS (the seeds' LLaDA settings).

The UPS is a head on the backbone's last hidden state (remedi_patches.ups_head) or, for a dual-stream RemeDi
(has_ups_stream), the model's own UPS stream. Rows (remedi_patches.block_layout, --layout): [prompt | answer]
(sequence) or the paper's [prompt | clean answer | noisy answer] with block-causal attention (block_diffusion);
answers EOS-padded to a multiple of --block_length, the batch to its longest row.

Per sequence (prompt never noised; block_diffusion: per answer block of the noisy copy, p_mask the block's realised
masked fraction): t ~ U(eps, 1); answer tokens masked with rho_mask(t) = t; unmasked answer tokens replaced by a
different token with rho_incorrect(t) = 4 r t (1 - t), drawn uniformly from the vocabulary (--incorrect_source
uniform), sampled from the backbone's own TPS distribution at that position, truth excluded
(tps: one extra no-grad forward with the masked and the to-be-corrupted positions as [MASK]), or drawn from the
tokens of the global batch's x_t, truth excluded (context, the paper's). Loss = TPS (CE on masked positions /
p_mask, normalised by answer length) + lambda_ups * UPS (BCE over all answer positions; labels 1 clean, 0 incorrect,
stop-gradient p(true token) where masked, smoothed to 1 - eps / eps / eps + (1 - 2 eps) p by --label_smoothing eps).
The maths lives in remedi_patches.noise / .losses.

Modes (--train_mode):
  ups_only     backbone frozen; only the UPS trains (--lr): the head (backbone run under torch.no_grad), or the
               UPS stream of a dual-stream model with its feedback and main stream frozen (its TPS stays exact).
  joint        (heads) LoRA on the backbone trained by the TPS loss (--lr_lora), the head by the UPS loss (--lr_ups)
               on detached hidden states, unless --ups_grad_to_lora lets the UPS loss reach the LoRA weights too.
  alternating  (heads) --alt_ratio TPS (LoRA) updates, then one UPS (head) update, repeated.
  full         every weight trains on TPS + lambda_ups * UPS: the backbone (--lr_backbone) and the UPS (--lr); the
               UPS loss reaches the backbone (through the head's input, or a dual-stream model's feedback).

--recipe paper sets the paper's values together (PAPER_RECIPE; every flag given explicitly wins): block_diffusion
rows, context incorrect tokens, label smoothing 0.05, lambda_ups 0.3, full mode, 50 warmup updates and a cosine
floor of half the peak.

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
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.diffusion import seeded_generator
from lit_gpt.training import (FabricConfig, RunConfig, Schedule, TrainGroup, apply_gradient_checkpointing,
                              claim_outputs, csv_logger, default_precision, export_smdm, fit, hparams_of,
                              latest_checkpoint, num_parameters, require_finite, require_path, resume_path,
                              setup_fabric)
from remedi_patches import data as sft_data
from remedi_patches.backbones import (Backbone, backbone_kind, fsdp_block_classes, load_backbone, max_length_of,
                                     unwrap)
from remedi_patches.block_layout import (LAYOUTS, RemaskRows, build_rows, micro_batch, require_rows_fit,
                                         row_lengths)
from remedi_patches.cli import UserError, arg, fill_none, recipe_help
from remedi_patches.detection import MODEL_META_FILE, DetectionSettings, measure_detection
from remedi_patches.losses import RemaskLosses, remask_losses
from remedi_patches.modeling_wrappers import (check_head_fits, has_ups_stream, hidden_size_of, load_ups_head,
                                              save_ups_head, ups_input_forward, ups_stream_parts)
from remedi_patches.noise import (INCORRECT_SOURCES, RemaskBatch, check_noise_settings, noise_special_ids,
                                  remask_noise, tps_incorrect_noise)
from remedi_patches.trajectory_views import write_text
from remedi_patches.ups_head import UPSHead

TRAIN_MODES = ("ups_only", "joint", "alternating", "full")
RECIPES = ("paper",)
# defaults resolved by RemaskConfig.check(), first match wins: a flag given, --recipe paper (PAPER_RECIPE, then
# the paper's learning rate for the model), the model's recipe (EMBEDDED_RECIPE / GENERAL_DEFAULTS), BASE_DEFAULTS.
# The embedded recipe is the demo's (held-out AUC ~0.9 in 100 updates).
EMBEDDED_RECIPE = {"seq_len": 72, "batch_size": 32, "max_steps": 400, "lr": 3e-3, "warmup_steps": 20,
                   "ups_width": 128, "eval_samples": 256}
GENERAL_DEFAULTS = {"seq_len": 128, "batch_size": 8, "max_steps": 0, "lr": 1e-4, "warmup_steps": 0,
                    "ups_width": None, "eval_samples": 64}
BASE_DEFAULTS = {"layout": "sequence", "incorrect_source": "uniform", "label_smoothing": 0.0, "lambda_ups": 1.0,
                 "train_mode": "ups_only", "min_lr_ratio": 0.1}
PAPER_RECIPE = {"layout": "block_diffusion", "incorrect_source": "context", "label_smoothing": 0.05,
                "lambda_ups": 0.3, "train_mode": "full", "min_lr_ratio": 0.5, "warmup_steps": 50}
# all weights train. Embedded: the UPS at the backbone's SFT peak, the backbone at its SFT's final lr (at 1e-3 its
# TPS loss rose from 0.12 to 0.20 in 160 updates); LLaDA-8B: the paper's 2e-6 for both
PAPER_LR = {"embedded": {"lr": 1e-3, "lr_backbone": 1e-4}, "general": {"lr": 2e-6}}


def _by_model(name: str, what: str = "") -> str:
    """Help text of a model-dependent default."""
    general = "0, or the loaded head's" if name == "ups_width" else GENERAL_DEFAULTS[name]
    when = "with the embedded model (the demo's recipe)" if what else "with the embedded model"
    paper = {"lr": f" ({PAPER_LR['embedded']['lr']:g} / {PAPER_LR['general']['lr']:g} with --recipe paper)",
             "warmup_steps": f" ({PAPER_RECIPE['warmup_steps']} with --recipe paper)"}.get(name, "")
    return recipe_help(what, EMBEDDED_RECIPE[name], when, general) + paper


def _by_recipe(name: str, what: str) -> str:
    """Help text of a default that --recipe paper changes."""
    return f"{what}; default {BASE_DEFAULTS[name]}, {PAPER_RECIPE[name]} with --recipe paper"
STREAM_ORDER, STREAM_NOISE, STREAM_EVAL, STREAM_PROPOSE = 10, 11, 12, 13
PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


@dataclass
class RemaskConfig(FabricConfig, RunConfig):
    # backbone
    model_name: str = arg("embedded", "'embedded' (the shipped tiny model), 'embedded_remedi' (the shipped "
                          "dual-stream RemeDi), a LLaDA or RemeDi folder or hub name, an SMDM export folder (single or "
                          "dual stream), or an SMDM iter-*-ckpt.pth (then --smdm_size and --tokenizer)",
                          group="backbone")
    add_ups_stream: bool = arg(False, "give a single-stream SMDM backbone a fresh UPS stream (lit_gpt.dual_stream."
                               "remedi_from_backbone: blocks copied from the main stream, feedback zero) and train it "
                               "as a dual-stream RemeDi", group="backbone")
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
    recipe: Optional[str] = arg(None, "'paper': the paper's Remask SFT (block_diffusion layout, context incorrect "
                                "tokens, label smoothing 0.05, lambda_ups 0.3, full mode, 50 warmup updates, cosine "
                                "floor 0.5 x peak); flags given explicitly win", choices=RECIPES, group="remask SFT")
    layout: Optional[str] = arg(None, _by_recipe("layout", "rows: 'sequence' [prompt | answer] or 'block_diffusion' "
                                "[prompt | clean | noisy] with block-causal attention and one t per block"),
                                choices=LAYOUTS, group="remask SFT")
    block_length: int = arg(32, "answers are EOS-padded to a multiple of it; the block of block_diffusion",
                            group="remask SFT")
    # optimisation
    batch_size: Optional[int] = arg(None, _by_model("batch_size", "sequences per device per micro-batch"),
                                    group="optimisation")
    grad_accum: int = arg(1, "micro-batches per optimizer update", group="optimisation")
    epochs: int = arg(1, "passes over the data (unless --max_steps)", group="optimisation")
    max_steps: Optional[int] = arg(None, _by_model("max_steps", "optimizer updates; 0: from --epochs"),
                                   group="optimisation")
    lr: Optional[float] = arg(None, _by_model("lr", "peak learning rate of the UPS (head or stream)"),
                              group="optimisation")
    lr_backbone: Optional[float] = arg(None, "peak learning rate of the backbone (main stream) in full mode; default "
                                       f"--lr ({PAPER_LR['embedded']['lr_backbone']:g} with --recipe paper on the "
                                       "embedded model)", group="optimisation")
    lr_ups: Optional[float] = arg(None, "head learning rate in joint/alternating; default --lr", group="optimisation")
    lr_lora: float = arg(5e-5, "peak learning rate of the LoRA weights", group="optimisation")
    min_lr_ratio: Optional[float] = arg(None, _by_recipe("min_lr_ratio", "cosine decay ends at ratio x peak"),
                                        group="optimisation")
    warmup_steps: Optional[int] = arg(None, _by_model("warmup_steps", "linear warmup updates"),
                                      group="optimisation")
    weight_decay: float = arg(0.0, "AdamW weight decay", group="optimisation")
    grad_clip: float = arg(1.0, "gradient-norm clip (0 disables)", group="optimisation")
    # Remask SFT
    lambda_ups: Optional[float] = arg(None, _by_recipe("lambda_ups", "total = TPS + lambda_ups * UPS"),
                                      group="remask SFT")
    r_incorrect: float = arg(0.1, "rho_incorrect(t) = 4 r t (1 - t)", group="remask SFT")
    incorrect_source: Optional[str] = arg(None, _by_recipe("incorrect_source", "incorrect tokens: 'uniform' over "
                                          "the non-special vocabulary; 'tps': sampled from the backbone's TPS at that "
                                          "position, truth excluded (the sampler's plausible mistakes); 'context' "
                                          "(the paper's): drawn from the tokens of the batch's x_t, truth excluded"),
                                          choices=INCORRECT_SOURCES, group="remask SFT")
    label_smoothing: Optional[float] = arg(None, _by_recipe("label_smoothing", "UPS labels eps: 1 - eps correct, "
                                           "eps incorrect, eps + (1 - 2 eps) p_TPS masked"), group="remask SFT")
    eps: float = arg(1e-3, "t ~ U(eps, 1)", group="remask SFT")
    train_mode: Optional[str] = arg(None, _by_recipe("train_mode", "ups_only: the UPS only, backbone frozen; "
                                    "joint: LoRA by TPS + head by UPS in every update; alternating: --alt_ratio LoRA "
                                    "updates then one head update; full: every weight by TPS + lambda_ups * UPS"),
                                    choices=TRAIN_MODES, group="remask SFT")
    ups_grad_to_lora: bool = arg(False, "joint: the UPS loss reaches the LoRA weights too (the head reads "
                                 "hidden states with their gradient)", group="remask SFT")
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
    save_model_dir: Optional[str] = arg(None, "where a model whose weights train goes (full mode, or a dual-stream "
                                        "model): its folder with the tokenizer; default <out_dir>/model",
                                        group="evaluation and checkpoints")
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
        return self.train_mode in ("joint", "alternating")

    @property
    def model_dir(self) -> Path:
        return Path(self.save_model_dir) if self.save_model_dir else Path(self.out_dir) / "model"

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
        return self.model_name in ("embedded", "embedded_remedi")

    def resolve_defaults(self) -> "RemaskConfig":
        """Fill the model-dependent defaults left None: EMBEDDED_RECIPE for the embedded backbone (seq_len 72 only
        on the embedded task: other data gets the model's 128), GENERAL_DEFAULTS otherwise. Idempotent."""
        if self.recipe == "paper":
            fill_none(self, {**PAPER_RECIPE, **PAPER_LR["embedded" if self.embedded_model else "general"]})
        recipe = dict(EMBEDDED_RECIPE if self.embedded_model else GENERAL_DEFAULTS)
        if self.dataset != "embedded":
            recipe["seq_len"] = GENERAL_DEFAULTS["seq_len"]
        keep_none = ["ups_width"] if self.load_ups_head is not None else []  # the loaded head's width
        return fill_none(self, {**BASE_DEFAULTS, **recipe}, keep_none)

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
        if self.recipe is not None and self.recipe not in RECIPES:
            raise UserError(f"--recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.layout not in LAYOUTS:
            raise UserError(f"--layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.block_length < 1:
            raise UserError(f"--block_length must be >= 1, got {self.block_length}")
        if self.add_ups_stream:  # the model is known to be dual-stream before it loads
            check_mode(self, dual=True)
        if self.ups_grad_to_lora and self.train_mode != "joint":
            raise UserError(f"--ups_grad_to_lora applies to --train_mode joint only (got {self.train_mode}); drop it")
        for name in ("lr", "lr_lora", "lr_ups", "lr_backbone"):
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
        if not self.embedded_model:
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
    """What optimizer update `step` (0-based) trains: 'ups' (head), 'tps' (LoRA), 'joint' (both) or 'full'."""
    if mode == "ups_only":
        return "ups"
    if mode in ("joint", "full"):
        return mode
    return "ups" if step % (alt_ratio + 1) == alt_ratio else "tps"


def update_counts(mode: str, steps: int, alt_ratio: int) -> tuple[int, int]:
    """(TPS updates, UPS updates) made by optimizer steps 0 .. steps - 1."""
    if mode == "ups_only":
        return 0, steps
    if mode in ("joint", "full"):
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


def propose_incorrect(model, rows: RemaskRows, batch: RemaskBatch, mask_id: int, vocab_size: int,
                      special: list[int], generator: torch.Generator) -> RemaskBatch:
    """--incorrect_source tps: `batch` with its incorrect tokens sampled from the backbone's TPS, run in eval mode
    and without grad as the sampler runs it (same t, masked and incorrect sets; the rows' attention)."""
    was_training = model.training
    model.eval()
    try:
        return tps_incorrect_noise(lambda x: ups_input_forward(model, x, rows.attention_mask, rows.position_ids)[0],
                                   rows.input_ids, batch, mask_id, vocab_size, special, generator)
    finally:
        model.train(was_training)


def remask_forward(model, head: Optional[UPSHead], batch: RemaskBatch, rows: RemaskRows, kind: str,
                   lambda_ups: float, label_smoothing: float = 0.0, ups_grad_to_backbone: bool = False,
                   ups_normaliser: Optional[float] = None) -> tuple[RemaskLosses, torch.Tensor]:
    """One forward of the model (and head) on a noised batch -> (losses, UPS logits (B, L)).

    head None: a dual-stream model gives both outputs, autograd on unless kind is 'eval' (its frozen weights get no
    gradient). With a head, kind 'joint' | 'tps' | 'ups' | 'full' (see step_kind) or 'eval': the backbone runs with
    autograd only when the TPS trains ('joint', 'tps', 'full'); the head reads DETACHED hidden states unless
    ups_grad_to_backbone (full mode, or joint with --ups_grad_to_lora), and runs without grad in a 'tps' update.
    """
    mask, positions = rows.attention_mask, rows.position_ids
    if head is None:
        with torch.set_grad_enabled(kind != "eval"):
            logits, ups_logits = ups_input_forward(model, batch.noisy, mask, positions, True)  # (B, L, V), (B, L)
    else:
        with torch.set_grad_enabled(kind in ("joint", "tps", "full")):
            logits, hidden = ups_input_forward(model, batch.noisy, mask, positions, True)  # (B, L, V), (B, L, d)
        with torch.set_grad_enabled(kind in ("joint", "ups", "full")):
            ups_logits = head(hidden if ups_grad_to_backbone else hidden.detach())  # (B, L)
    losses = remask_losses(logits, ups_logits, rows.input_ids, batch.noisy, batch.masked, batch.incorrect,
                           batch.p_mask, rows.answer_mask, rows.answer_len, lambda_ups, label_smoothing,
                           ups_normaliser)
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
                               answer_len=ex.answer_len[idx], answer_tokens=ex.answer_tokens[idx])


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
    `self.groups(step)` (the TrainGroups that update `step` moves, by step_kind)."""

    def __init__(self, fabric, cfg: RemaskConfig, model, head: Optional[UPSHead], examples: sft_data.SFTExamples,
                 tokens: dict, groups: dict[str, TrainGroup]):
        self.fabric, self.cfg, self.model, self.head, self.ex = fabric, cfg, model, head, examples
        self.tokens, self.named_groups = tokens, groups  # tokens: mask_id, eos_id, vocab_size, special
        self.global_batch = cfg.batch_size * fabric.world_size * cfg.grad_accum

    def groups(self, step: int) -> list[TrainGroup]:
        kind = step_kind(self.cfg.train_mode, step, self.cfg.alt_ratio)
        trains = {"ups": ("ups", "model"), "tps": ("lora",), "joint": ("ups", "lora"),
                  "full": ("ups", "model")}[kind]
        return [g for name, g in self.named_groups.items() if name in trains]

    @lru_cache(maxsize=1)
    def plan(self, step: int) -> tuple[RemaskRows, RemaskBatch]:
        """Rows and noise of the whole global batch of update `step` (CPU, the same on every rank)."""
        cfg, ex, tok = self.cfg, self.ex, self.tokens
        idx = sample_indices(cfg.seed, len(ex), step * self.global_batch, self.global_batch)
        rows = build_rows(ex.input_ids[idx], ex.prompt_len[idx], ex.answer_tokens[idx], cfg.layout, cfg.block_length,
                          tok["eos_id"])
        noise = remask_noise(rows.input_ids, rows.answer_mask, rows.block_index, cfg.layout, tok["mask_id"],
                             cfg.r_incorrect, tok["vocab_size"], tok["special"],
                             seeded_generator(cfg.seed, STREAM_NOISE, step), cfg.eps,
                             context=cfg.incorrect_source == "context")
        return rows, noise

    def __call__(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        cfg, fabric, tok = self.cfg, self.fabric, self.tokens
        part = micro * fabric.world_size + fabric.global_rank
        global_rows, global_noise = self.plan(step)
        rows, noise = micro_batch(global_rows, global_noise, slice(part * cfg.batch_size, (part + 1) * cfg.batch_size))
        rows, noise = rows.to(fabric.device), RemaskBatch(*(x.to(fabric.device) for x in noise))
        kind = step_kind(cfg.train_mode, step, cfg.alt_ratio)
        with fabric.autocast():
            if cfg.incorrect_source == "tps":
                noise = propose_incorrect(self.model, rows, noise, tok["mask_id"], tok["vocab_size"], tok["special"],
                                          seeded_generator(cfg.seed, STREAM_PROPOSE, step, part))
            # the UPS token mean of the whole global batch, whatever its split into ranks and micro-batches
            # (logged means over ranks and micro-batches are then global figures)
            ups_normaliser = float(global_rows.answer_mask.sum().clamp(min=1)) / (fabric.world_size * cfg.grad_accum)
            losses, _ = remask_forward(self.model, self.head, noise, rows, kind, cfg.lambda_ups, cfg.label_smoothing,
                                       ups_grad_to_backbone=cfg.train_mode == "full" or cfg.ups_grad_to_lora,
                                       ups_normaliser=ups_normaliser)
        n_answer = ups_normaliser  # fractions of the global batch's scored tokens, as the UPS loss
        tps_updates, ups_updates = update_counts(cfg.train_mode, step + 1, cfg.alt_ratio)
        metrics = {"loss": losses.total.detach(), "tps_loss": losses.tps.detach(), "ups_loss": losses.ups.detach(),
                   "mask_frac": noise.masked.sum() / n_answer, "incorrect_frac": noise.incorrect.sum() / n_answer,
                   "tps_update": int(kind != "ups"), "ups_update": int(kind != "tps"),
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
    folders = {"--save_lora_dir": cfg.lora_dir, "--save_model_dir": cfg.save_model_dir}
    with claim_outputs(out_dir, files={"--save_path": cfg.head_path}, folders=folders):
        return _run(cfg, backbone, out_dir)


def load_model(cfg: RemaskConfig, device, dtype) -> Backbone:
    """--model_name as load_backbone reads it; with --add_ups_stream, that single-stream SMDM backbone with a fresh
    UPS stream (lit_gpt.dual_stream.remedi_from_backbone, seeded by --seed: its TPS equals the backbone's)."""
    backbone = load_backbone(cfg.model_name, device=device, dtype=dtype, smdm_size=cfg.smdm_size,
                             tokenizer=cfg.tokenizer)
    if not cfg.add_ups_stream:
        return backbone
    if backbone.kind != "smdm" or has_ups_stream(backbone.model):
        what = "already a dual-stream RemeDi" if has_ups_stream(backbone.model) else f"a {backbone.kind} model"
        raise UserError(f"--add_ups_stream takes a single-stream SMDM backbone; {cfg.model_name} is {what}: drop the "
                        "flag")
    from lit_gpt.dual_stream import remedi_from_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = remedi_from_backbone(backbone.model)
    return dataclasses.replace(backbone, model=model)


def check_mode(cfg: RemaskConfig, dual: bool) -> None:
    """UserError for settings a dual-stream model does not take (it has no head and trains without LoRA here)."""
    if not dual:
        return
    name = f"{cfg.model_name} with --add_ups_stream" if cfg.add_ups_stream else cfg.model_name
    if cfg.train_mode not in ("ups_only", "full"):
        raise UserError(f"--train_mode {cfg.train_mode} trains LoRA beside a UPS head; {name} is a dual-stream RemeDi "
                        "(its own UPS stream): use --train_mode full or ups_only")
    given = [flag for flag, value in (("--load_ups_head", cfg.load_ups_head), ("--save_path", cfg.save_path),
                                      ("--load_lora_dir", cfg.load_lora_dir)) if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} applies to a UPS head or LoRA; {name} is a dual-stream RemeDi whose UPS "
                        "stream trains in place (written to --save_model_dir): drop it")


def trainable_parts(model, dual: bool, mode: str) -> tuple[list, list]:
    """(UPS parameters, main-stream / backbone parameters) that train, their requires_grad set. Dual stream:
    ups_only trains the UPS stream alone (feedback frozen, so the TPS stays exact); full trains everything, the
    feedback with the UPS stream. A backbone with a head: full trains every backbone weight (the head is apart)."""
    if dual:
        stream, feedback = ups_stream_parts(model)
        ups = stream + (feedback if mode == "full" else [])
        chosen = {id(p) for p in ups}
        main = [p for p in model.parameters() if id(p) not in chosen] if mode == "full" else []
    else:
        ups, main = [], list(model.parameters()) if mode == "full" else []
    for param in ups + main:
        param.requires_grad_(True)
    return ups, main


def _run(cfg: RemaskConfig, backbone, out_dir: Path) -> dict:
    records = load_split_records(cfg)
    fabric = setup_fabric(cfg, wrap_blocks=_wrap_blocks(cfg), loggers=[csv_logger(out_dir)])
    precision = cfg.precision or default_precision(cfg.accelerator)
    if backbone is None:
        backbone = load_model(cfg, fabric.device, PRECISION_DTYPES.get(precision))
    model, tokenizer = backbone.model.to(fabric.device), backbone.tokenizer
    dual = has_ups_stream(model)
    check_mode(cfg, dual)
    eos_id = backbone.eos_id if backbone.eos_id is not None else tokenizer.eos_token_id
    mask_id = backbone.mask_id if cfg.mask_id is None else cfg.mask_id
    tokens = {"mask_id": mask_id, "eos_id": eos_id, "vocab_size": len(tokenizer),
              "special": noise_special_ids(tokenizer, mask_id, eos_id, backbone.eot_id)}

    train_ex, eval_ex = split_train_eval(cfg, tokenizer, records)
    longest = max(int(row_lengths(ex.prompt_len, ex.answer_tokens, cfg.layout, cfg.block_length).max())
                  for ex in (train_ex, eval_ex) if ex is not None)
    require_rows_fit(longest, cfg.layout, cfg.block_length, max_length_of(model))
    global_batch = cfg.batch_size * fabric.world_size * cfg.grad_accum
    max_steps = cfg.max_steps or cfg.epochs * max(1, len(train_ex) // global_batch)

    fabric.seed_everything(cfg.seed)
    model.requires_grad_(False)
    peft_model = None
    if cfg.lora_trained or cfg.load_lora_dir is not None:
        peft_model = add_lora(cfg, model, backbone.kind, trainable=cfg.lora_trained)
    ups_params, main_params = trainable_parts(model, dual, cfg.train_mode)
    model.train(cfg.train_mode != "ups_only" or dual)
    apply_gradient_checkpointing(model, cfg)
    raw_head = None if dual else build_head(cfg, model)
    ups_size = sum(p.numel() for p in ups_params) if dual else num_parameters(raw_head)
    fabric.print(f"Remask SFT ({cfg.train_mode}, {cfg.layout} rows{', recipe ' + cfg.recipe if cfg.recipe else ''}) "
                 f"on {backbone.name}: {num_parameters(model):,} {'model' if dual else 'backbone'} parameters "
                 f"({num_parameters(model, trainable=True):,} trainable), "
                 f"{'UPS stream' if dual else 'head'} {ups_size:,}; {len(train_ex)} train / "
                 f"{0 if eval_ex is None else len(eval_ex)} held-out rows of up to {longest} tokens, {max_steps} "
                 f"updates of {global_batch} sequences")
    lr_ups = cfg.lr if cfg.train_mode in ("ups_only", "full") else (cfg.lr_ups or cfg.lr)
    lr_backbone = cfg.lr_backbone or cfg.lr
    fabric.print("  " + ", ".join(f"{k} {getattr(cfg, k)}" for k in PAPER_RECIPE) + f", lr {lr_ups:g}" +
                 (f", lr_backbone {lr_backbone:g}" if cfg.train_mode == "full" else ""))
    hparams = hparams_of(cfg)
    state = {"step_count": 0, "iter_num": 0, "hparams": hparams}
    groups: dict[str, TrainGroup] = {}
    head = None
    if dual:  # one module, one optimizer: the UPS parts at --lr, the main stream at --lr_backbone (lr_scale)
        model = fabric.setup_module(model)
        ups_ids = {id(p) for p in ups_params}
        param_groups = [{"params": [p for p in model.parameters() if id(p) in ups_ids]}]
        if main_params:
            param_groups.append({"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ups_ids],
                                 "lr_scale": lr_backbone / lr_ups})
        opt = fabric.setup_optimizers(torch.optim.AdamW(param_groups, lr=lr_ups, weight_decay=cfg.weight_decay))
        state.update(model=model, opt_model=opt)
        groups["model"] = TrainGroup(model, opt, lr=lr_ups, min_lr=lr_ups * cfg.min_lr_ratio, name="ups", flag="--lr")
    else:
        head = fabric.setup_module(raw_head)
        opt_head = fabric.setup_optimizers(torch.optim.AdamW(head.parameters(), lr=lr_ups,
                                                             weight_decay=cfg.weight_decay))
        state.update(head=head, opt_head=opt_head)
        head_flag = "--lr_ups" if cfg.lr_ups is not None and cfg.train_mode in ("joint", "alternating") else "--lr"
        groups["ups"] = TrainGroup(head, opt_head, lr=lr_ups, min_lr=lr_ups * cfg.min_lr_ratio, name="ups",
                                   flag=head_flag)
    if not dual and (cfg.lora_trained or cfg.train_mode == "full"):
        model = fabric.setup_module(model)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = cfg.lr_lora if cfg.lora_trained else lr_backbone
        opt = fabric.setup_optimizers(torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay))
        name = "lora" if cfg.lora_trained else "model"
        if cfg.lora_trained:  # checkpoints hold the LoRA weights only (the frozen base comes from --model_name);
            # FSDP shards the parameters, so there the wrapped module is saved whole
            state.update(lora=model if cfg.strategy == "fsdp" else torch.nn.ParameterList(params), opt_lora=opt)
        else:
            state.update(model=model, opt_model=opt)
        groups[name] = TrainGroup(model, opt, lr=lr, min_lr=lr * cfg.min_lr_ratio, name="backbone" if name == "model"
                                  else "lora", flag="--lr_lora" if cfg.lora_trained else
                                  ("--lr_backbone" if cfg.lr_backbone else "--lr"))

    step = RemaskStep(fabric, cfg, model, head, train_ex, tokens, groups)
    settings = DetectionSettings(r_incorrect=cfg.r_incorrect, incorrect_source=cfg.incorrect_source, eps=cfg.eps,
                                 seed=cfg.seed, batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing,
                                 layout=cfg.layout, block_length=cfg.block_length)

    def evaluate() -> dict:
        return measure_detection(model, head, eval_ex, mask_id=mask_id, vocab_size=tokens["vocab_size"],
                                 special_ids=tokens["special"], settings=settings, autocast=fabric.autocast,
                                 device=fabric.device, eos_id=eos_id).metrics()

    schedule = Schedule(max_steps=max_steps, warmup_steps=cfg.warmup_steps, grad_accum=cfg.grad_accum,
                        grad_clip=cfg.grad_clip, save_interval=cfg.save_every, eval_interval=cfg.eval_every,
                        divergence_factor=cfg.divergence_factor)
    result = fit(fabric, state, step, step.groups, schedule, out_dir, evaluate if eval_ex is not None else None,
                 resume=resume_path(out_dir, cfg.resume), hparams=hparams)
    return _save_outputs(cfg, fabric, state, result, backbone, dual, raw_head, peft_model, out_dir, mask_id)


def _save_outputs(cfg: RemaskConfig, fabric, state: dict, result, backbone: Backbone, dual: bool, raw_head,
                  peft_model, out_dir: Path, mask_id: int) -> dict:
    """Write the trained parts (the model folder when its weights trained, the head, the adapter); the summary."""
    tps_updates, ups_updates = update_counts(cfg.train_mode, state["step_count"], cfg.alt_ratio)
    model_dir = cfg.model_dir if dual or cfg.train_mode == "full" else None
    head_path = None if dual else cfg.head_path
    lora_dir = cfg.lora_dir
    if model_dir is not None:
        export_model(fabric, out_dir, backbone, model_dir)
    if fabric.global_rank == 0:
        fix = "Train again with a lower learning rate."
        if head_path is not None:
            require_finite(raw_head, f"the UPS head for {head_path}", fix)
        if lora_dir is not None:
            require_finite([p for n, p in peft_model.named_parameters() if "lora_" in n], f"the adapter for {lora_dir}",
                           fix)
        meta = {"mask_id": mask_id, "backbone": str(model_dir) if model_dir else backbone.name,
                "backbone_kind": backbone.kind,
                "prompt_template": None if cfg.chat_template else (cfg.prompt_template or
                                                                    sft_data.render_prompt("{question}")),
                "train_args": state["hparams"], "updates": state["step_count"], **result.evaluation}
        if head_path is not None:
            save_ups_head(head_path, raw_head, meta)
        if model_dir is not None:  # the settings detection / the benchmark measure the model with
            write_text(model_dir / MODEL_META_FILE, json.dumps(meta, indent=2, default=str) + "\n")
        if lora_dir is not None:
            peft_model.save_pretrained(str(lora_dir))
        written = [f"{what} -> {path}" for what, path in (("model", model_dir), ("UPS head", head_path),
                                                           ("LoRA adapter", lora_dir)) if path is not None]
        fabric.print(", ".join(written))
    fabric.barrier()
    summary = {"updates": state["step_count"], "tps_updates": tps_updates, "ups_updates": ups_updates,
               "model_dir": None if model_dir is None else str(model_dir),
               "head_path": None if head_path is None else str(head_path),
               "lora_dir": None if lora_dir is None else str(lora_dir),
               "metrics_csv": str(Path(fabric.logger.log_dir) / "metrics.csv"), **result.evaluation}
    fabric.print(json.dumps({k: None if v != v else v for k, v in summary.items()}, indent=2))  # NaN AUC -> null
    return {**summary, "losses": result.losses}


def export_model(fabric, out_dir: Path, backbone: Backbone, model_dir: Path) -> None:
    """Write the trained model of the newest checkpoint in `out_dir` (a full state dict under "model", whatever the
    strategy) as a folder `load_backbone` reads, with the tokenizer (and an SMDM source folder's task.json)."""
    if backbone.kind == "smdm":
        export_smdm(fabric, out_dir, unwrap(backbone.model).config, model_dir, backbone.tokenizer)
        task = Path(backbone.name) / "task.json"  # backbone.name: the folder it was loaded from
        if fabric.global_rank == 0 and task.is_file():
            shutil.copy2(task, model_dir / "task.json")
        return
    if fabric.global_rank == 0:
        state = torch.load(latest_checkpoint(out_dir), map_location="cpu", weights_only=True, mmap=True)["model"]
        model = load_backbone(backbone.name, device="meta").model
        model.load_state_dict(state, assign=True)
        require_finite(model, f"the model for {model_dir}", "Train again with a lower learning rate.")
        model.save_pretrained(str(model_dir))
        backbone.tokenizer.save_pretrained(str(model_dir))
    fabric.barrier()
