"""Remask SFT (RemeDi, DESIGN.md 3.4) with Lightning Fabric: train a UPS head, optionally LoRA on the TPS.

    python SMDM/pretrain/train_remedi.py                                   # embedded backbone + task, UPS head only
    python SMDM/pretrain/train_remedi.py --model_name GSAI-ML/LLaDA-8B-Base --dataset simplescaling/s1K-1.1 \
        --seq_len 1024 --batch_size 1 --lr 1e-4 --save_path checkpoints/ups_head.safetensors
    python SMDM/pretrain/train_remedi.py --model_name iter-010000-ckpt.pth --smdm_size Diff_LLaMA_170M \
        --tokenizer TinyLlama/TinyLlama-1.1B-intermediate-step-480k-1T --dataset data/gsm8k --train_mode joint

Per sequence (prompt never noised): t ~ U(eps, 1); answer tokens masked with rho_mask(t) = t; unmasked answer
tokens replaced by a different token with rho_incorrect(t) = 4 r t (1 - t), drawn uniformly from the vocabulary
(--incorrect_source uniform) or sampled from the backbone's own TPS distribution at that position, truth excluded
(tps: one extra no-grad forward with the masked and the to-be-corrupted positions as [MASK]). Loss = TPS (CE on
masked positions / p_mask, normalised by answer length) + lambda_ups * UPS (BCE over all answer positions; labels
1 clean, 0 incorrect, stop-gradient p(true token) where masked). The maths lives in remedi_patches.noise / .losses;
this script is the Fabric wiring.

Modes (--train_mode):
  ups_only     backbone frozen and run under torch.no_grad; only the head trains (--lr).
  joint        LoRA on the backbone trained by the TPS loss (--lr_lora), the head by the UPS loss (--lr_ups) on
               detached hidden states, so the UPS loss never reaches the backbone. One update moves both.
  alternating  --alt_ratio TPS (LoRA) updates, then one UPS (head) update, repeated.

Determinism: the samples and the noise of optimizer step s come from generators seeded by (--seed, s) for
the whole global batch (batch_size x devices x grad_accum), each rank / micro-batch takes its slice (tps incorrect
tokens: a generator seeded by (--seed, s, slice)), so a killed run resumed from its newest checkpoint (--out_dir)
continues the same trajectory.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # SMDM/ (lit_gpt)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root (remedi_patches)

import torch

from lit_gpt.diffusion import seeded_generator
from lit_gpt.training import (add_fabric_args, checkpoint_name, cosine_lr, csv_logger, default_precision,
                              load_checkpoint, num_parameters, progress, resume_path, save_checkpoint, setup_fabric)
from remedi_patches import data as sft_data
from remedi_patches.embedded.task import format_prompt
from remedi_patches.losses import RemaskLosses, remask_losses
from remedi_patches.metrics import confusion_at, detection_scores, roc_auc
from remedi_patches.modeling_wrappers import (backbone_forward, check_head_fits, hidden_size_of, load_ups_head,
                                              save_ups_head)
from remedi_patches.noise import (INCORRECT_SOURCES, RemaskBatch, apply_remask_noise, noise_special_ids,
                                  tps_incorrect_noise)
from remedi_patches.ups_head import UPSHead

TRAIN_MODES = ("ups_only", "joint", "alternating")
STREAM_ORDER, STREAM_NOISE, STREAM_EVAL, STREAM_PROPOSE = 10, 11, 12, 13
LORA_TARGETS = {  # --lora_target auto: the linear layers of every transformer block (never the output head)
    "llada": r".*blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    "smdm": r".*\.h\.\d+\.(attn\.attn|attn\.proj|mlp\.swiglu\.w1|mlp\.swiglu\.w2|mlp\.swiglu\.w3)",
}
PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


@dataclass
class RemaskConfig:
    # backbone
    model_name: str = "embedded"
    smdm_size: Optional[str] = None
    tokenizer: Optional[str] = None
    mask_id: Optional[int] = None
    # data
    dataset: str = "embedded"
    split: str = "train"
    subset: Optional[str] = None
    text_field: Optional[str] = None
    prompt_field: Optional[str] = None
    answer_field: Optional[str] = None
    thinking_field: Optional[str] = None
    attempt_field: Optional[str] = None
    chat_template: bool = False
    prompt_template: Optional[str] = None
    max_records: Optional[int] = None
    seq_len: int = 128
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0
    lr: float = 1e-4
    lr_ups: Optional[float] = None
    lr_lora: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Remask SFT
    lambda_ups: float = 1.0
    r_incorrect: float = 0.1
    incorrect_source: str = "uniform"
    eps: float = 1e-3
    train_mode: str = "ups_only"
    alt_ratio: int = 1
    # UPS head
    ups_width: Optional[int] = None
    load_ups_head: Optional[str] = None
    save_path: Optional[str] = None
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target: str = "auto"
    load_lora_dir: Optional[str] = None
    save_lora_dir: Optional[str] = None
    # evaluation, checkpoints
    eval_split: Optional[str] = None
    eval_samples: int = 64
    eval_every: int = 100
    save_every: int = 100
    out_dir: str = "out/remedi"
    resume: str = "auto"
    seed: int = 1337
    # fabric
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Optional[str] = None


def build_parser() -> argparse.ArgumentParser:
    d = RemaskConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("backbone")
    m.add_argument("--model_name", default=d.model_name,
                   help="'embedded' (the shipped tiny model), a LLaDA folder or hub name, an SMDM export folder, "
                        "or an SMDM iter-*-ckpt.pth (then --smdm_size and --tokenizer)")
    m.add_argument("--smdm_size", default=None, help="SMDM config of a .pth checkpoint: Diff_LLaMA_170M or just 170")
    m.add_argument("--tokenizer", default=None, help="tokenizer folder or hub name when the model has none")
    m.add_argument("--mask_id", type=int, default=None,
                   help="[MASK] token id; default: the backbone's (126336 for LLaDA, vocab size for SMDM)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset,
                   help="'embedded', a local .json/.jsonl/.parquet file or folder, or a hub name")
    g.add_argument("--split", default=d.split, help="split to train on")
    g.add_argument("--subset", default=None, help="dataset config / sub-folder, e.g. educational_instruct")
    g.add_argument("--text_field", default=None, help="train on this whole field as the answer (no prompt)")
    g.add_argument("--prompt_field", default=None, help="prompt field; None: auto-detected")
    g.add_argument("--answer_field", default=None, help="answer field; None: auto-detected")
    g.add_argument("--thinking_field", default=None,
                   help="with --attempt_field: answer = 'Thinking: <thinking>\\n\\nAttempt: <attempt>' (s1K)")
    g.add_argument("--attempt_field", default=None, help="see --thinking_field")
    g.add_argument("--chat_template", action="store_true",
                   help="render prompt and answer with the tokenizer's chat template (instruct models)")
    g.add_argument("--prompt_template", default=None,
                   help="prompt text around {question} for non-chat data (as in eval_gsm_math.py); default: "
                        "'Question: {question}\\nAnswer:', the embedded task's and the evaluators' format")
    g.add_argument("--max_records", type=int, default=None,
                   help="use at most this many records (embedded: problems generated; default 4000)")
    g.add_argument("--seq_len", type=int, default=d.seq_len, help="tokens per row: prompt + answer + EOS padding")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=int, default=d.batch_size, help="sequences per device per micro-batch")
    o.add_argument("--grad_accum", type=int, default=d.grad_accum, help="micro-batches per optimizer update")
    o.add_argument("--epochs", type=int, default=d.epochs, help="passes over the data (unless --max_steps)")
    o.add_argument("--max_steps", type=int, default=d.max_steps, help="optimizer updates; 0: from --epochs")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the UPS head")
    o.add_argument("--lr_ups", type=float, default=None, help="head learning rate in joint/alternating; default --lr")
    o.add_argument("--lr_lora", type=float, default=d.lr_lora, help="peak learning rate of the LoRA weights")
    o.add_argument("--min_lr_ratio", type=float, default=d.min_lr_ratio, help="cosine decay ends at ratio x peak")
    o.add_argument("--warmup_steps", type=int, default=d.warmup_steps, help="linear warmup updates")
    o.add_argument("--weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    o.add_argument("--grad_clip", type=float, default=d.grad_clip, help="gradient-norm clip (0 disables)")
    r = p.add_argument_group("remask SFT")
    r.add_argument("--lambda_ups", type=float, default=d.lambda_ups, help="total = TPS + lambda_ups * UPS")
    r.add_argument("--r_incorrect", type=float, default=d.r_incorrect, help="rho_incorrect(t) = 4 r t (1 - t)")
    r.add_argument("--incorrect_source", default=d.incorrect_source, choices=INCORRECT_SOURCES,
                   help="incorrect tokens: 'uniform' over the non-special vocabulary, or 'tps': sampled from the "
                        "backbone's TPS at that position, truth excluded (the sampler's plausible mistakes)")
    r.add_argument("--eps", type=float, default=d.eps, help="t ~ U(eps, 1)")
    r.add_argument("--train_mode", default=d.train_mode, choices=TRAIN_MODES, help="see the module docstring")
    r.add_argument("--alt_ratio", type=int, default=d.alt_ratio, help="alternating: TPS updates per UPS update")
    h = p.add_argument_group("UPS head")
    h.add_argument("--ups_width", type=int, default=None,
                   help="hidden width of a new head (0: one Linear); default 0, or the loaded head's")
    h.add_argument("--load_ups_head", default=None, help="continue training this saved head")
    h.add_argument("--save_path", "--save_ups_head", dest="save_path", default=None,
                   help="where the trained head goes (safetensors); default <out_dir>/ups_head.safetensors")
    lo = p.add_argument_group("LoRA (joint / alternating)")
    lo.add_argument("--lora_r", type=int, default=d.lora_r, help="LoRA rank")
    lo.add_argument("--lora_alpha", type=int, default=d.lora_alpha, help="LoRA alpha")
    lo.add_argument("--lora_dropout", type=float, default=d.lora_dropout, help="LoRA dropout")
    lo.add_argument("--lora_target", default=d.lora_target,
                    help="'auto' (every block's linear layers) or comma-separated module names, e.g. q_proj,v_proj")
    lo.add_argument("--load_lora_dir", default=None,
                    help="continue from this adapter (in ups_only it is applied to the frozen backbone)")
    lo.add_argument("--save_lora_dir", default=None, help="where the adapter goes; default <out_dir>/lora")
    e = p.add_argument_group("evaluation and checkpoints")
    e.add_argument("--eval_split", default=None,
                   help="held-out split for the detection AUC; default: --eval_samples records held out of --split")
    e.add_argument("--eval_samples", type=int, default=d.eval_samples, help="held-out sequences (0: no evaluation)")
    e.add_argument("--eval_every", type=int, default=d.eval_every, help="evaluate every N updates (0: only at the end)")
    e.add_argument("--save_every", type=int, default=d.save_every,
                   help="resumable checkpoint every N updates (and after the last)")
    e.add_argument("--out_dir", default=d.out_dir, help="checkpoints, logs/version_k/metrics.csv, head, adapter")
    e.add_argument("--resume", default=d.resume,
                   help="'auto': newest checkpoint in --out_dir if any; 'none': start fresh; or a checkpoint path")
    e.add_argument("--seed", type=int, default=d.seed, help="seeds the head, LoRA, data order and noise")
    add_fabric_args(p)
    return p


def parse_config(argv: Optional[list[str]] = None) -> RemaskConfig:
    return check_config(RemaskConfig(**vars(build_parser().parse_args(argv))))


def check_config(cfg: RemaskConfig) -> RemaskConfig:
    """ValueError naming the first bad flag and the fix."""
    positive = {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "epochs": cfg.epochs, "alt_ratio": cfg.alt_ratio, "lora_r": cfg.lora_r}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    for name in ("max_steps", "eval_samples", "eval_every", "warmup_steps", "save_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.train_mode not in TRAIN_MODES:
        raise ValueError(f"--train_mode must be one of {TRAIN_MODES}, got {cfg.train_mode!r}")
    if not 0.0 <= cfg.r_incorrect <= 1.0:
        raise ValueError(f"--r_incorrect must be in [0, 1] (rho_incorrect peaks at r), got {cfg.r_incorrect}")
    if cfg.incorrect_source not in INCORRECT_SOURCES:
        raise ValueError(f"--incorrect_source must be one of {INCORRECT_SOURCES}, got {cfg.incorrect_source!r}")
    if cfg.lambda_ups < 0 or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError("--lambda_ups must be >= 0 and --min_lr_ratio in [0, 1]")
    if cfg.ups_width is not None and cfg.ups_width < 0:
        raise ValueError(f"--ups_width must be >= 0, got {cfg.ups_width}")
    if cfg.prompt_template is not None and "{question}" not in cfg.prompt_template:
        raise ValueError(f"--prompt_template {cfg.prompt_template!r} has no {{question}} placeholder; add one")
    if cfg.smdm_size is not None and not cfg.smdm_size.startswith("Diff_LLaMA_"):
        cfg.smdm_size = f"Diff_LLaMA_{cfg.smdm_size}M" if cfg.smdm_size.isdigit() else cfg.smdm_size
    return cfg


# ---------------------------------------------------------------- pure helpers


def step_kind(mode: str, step: int, alt_ratio: int) -> str:
    """What optimizer update `step` (0-based) trains: 'ups' (head), 'tps' (LoRA) or 'joint' (both)."""
    if mode == "ups_only":
        return "ups"
    if mode == "joint":
        return "joint"
    return "ups" if step % (alt_ratio + 1) == alt_ratio else "tps"


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
    """PEFT target_modules for --lora_target: the auto regex of the backbone kind, or a list of names."""
    target = LORA_TARGETS[kind] if spec == "auto" else [s.strip() for s in spec.split(",") if s.strip()]
    names = [n for n, _ in model.named_modules()]
    if isinstance(target, str):
        hit = any(re.fullmatch(target, n) for n in names)
    else:
        hit = any(n == t or n.endswith("." + t) for n in names for t in target)
    if not hit:
        raise ValueError(f"--lora_target {spec!r} matches no module of the {kind} backbone; pass module names "
                         f"such as {sorted({n.rsplit('.', 1)[-1] for n in names if n})[:12]}")
    return target


# ---------------------------------------------------------------- the trainer


def _load_backbone(cfg: RemaskConfig, device, dtype):
    from remedi_patches.backbones import load_backbone

    name = None if cfg.model_name == "embedded" else cfg.model_name
    return load_backbone(name, device=device, dtype=dtype, smdm_size=cfg.smdm_size, tokenizer=cfg.tokenizer)


def _examples(cfg: RemaskConfig, tokenizer, split: str, limit: Optional[int]):
    records = sft_data.load_records(cfg.dataset, split, cfg.subset, limit=limit)
    fields = sft_data.resolve_fields(sft_data.column_names(records), cfg.text_field, cfg.prompt_field,
                                     cfg.answer_field, cfg.thinking_field, cfg.attempt_field)
    return sft_data.build_sft_examples(records, tokenizer, cfg.seq_len, fields, cfg.chat_template,
                                       cfg.prompt_template)


def _split_train_eval(cfg: RemaskConfig, tokenizer):
    """(train examples, held-out examples or None)."""
    train = _examples(cfg, tokenizer, cfg.split, cfg.max_records)
    if cfg.eval_samples == 0:
        return train, None
    if cfg.eval_split is not None:
        held = _examples(cfg, tokenizer, cfg.eval_split, cfg.eval_samples)
        return train, held
    if len(train) <= cfg.eval_samples:
        raise ValueError(f"{len(train)} training examples cannot spare --eval_samples {cfg.eval_samples} for "
                         "evaluation; lower --eval_samples or pass --eval_split")
    order = torch.randperm(len(train), generator=seeded_generator(cfg.seed, STREAM_EVAL))
    keep, held = order[cfg.eval_samples:].sort().values, order[:cfg.eval_samples].sort().values
    return _rows(train, keep), _rows(train, held)


def _rows(ex: sft_data.SFTExamples, idx: torch.Tensor) -> sft_data.SFTExamples:
    return sft_data.SFTExamples(ex.input_ids[idx], ex.prompt_len[idx], ex.answer_len[idx], ex.dropped, ex.truncated)


def _add_lora(cfg: RemaskConfig, model, kind: str, trainable: bool):
    """Inject LoRA into `model` in place (new adapter or --load_lora_dir); returns the PEFT wrapper."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.load_lora_dir is not None:
        if not (Path(cfg.load_lora_dir) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter in {cfg.load_lora_dir} (adapter_config.json missing); pass "
                                    "the folder written by --save_lora_dir")
        return PeftModel.from_pretrained(model, cfg.load_lora_dir, is_trainable=trainable)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=resolve_lora_target(cfg.lora_target, kind, model), bias="none")
    return get_peft_model(model, lora)


def _build_head(cfg: RemaskConfig, model) -> UPSHead:
    if cfg.load_ups_head is None:
        return UPSHead(hidden_size_of(model), cfg.ups_width or 0)
    head, _ = load_ups_head(cfg.load_ups_head)
    check_head_fits(head, model)
    if cfg.ups_width is not None and cfg.ups_width != head.width:
        raise ValueError(f"--ups_width {cfg.ups_width} differs from the loaded head's width {head.width}; drop "
                         "--ups_width to continue training the loaded head")
    return head.train()


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
                   lambda_ups: float) -> tuple[RemaskLosses, torch.Tensor]:
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
                           answer_mask, answer_len, lambda_ups)
    return losses, ups_logits


def _objective(losses: RemaskLosses, kind: str) -> torch.Tensor:
    return losses.tps if kind == "tps" else losses.total


def run(cfg: RemaskConfig, backbone=None) -> dict:
    """Train as configured; returns the final metrics (same on every rank). `backbone`: a loaded
    remedi_patches.backbones.Backbone to use instead of loading --model_name."""
    check_config(cfg)
    out_dir = Path(cfg.out_dir)
    wrap_blocks = None
    if cfg.strategy == "fsdp":
        from lit_gpt.model import Block
        from remedi_patches.llada import LLaDABlock
        wrap_blocks = {Block, LLaDABlock}
    fabric = setup_fabric(cfg, wrap_blocks=wrap_blocks, loggers=[csv_logger(out_dir)])
    precision = cfg.precision or default_precision(cfg.accelerator)
    if backbone is None:
        backbone = _load_backbone(cfg, fabric.device, PRECISION_DTYPES.get(precision))
    model, tokenizer = backbone.model.to(fabric.device), backbone.tokenizer
    mask_id = backbone.mask_id if cfg.mask_id is None else cfg.mask_id
    limit = getattr(model.config, "max_sequence_length", None) or getattr(model.config, "block_size", None)
    if limit is not None and cfg.seq_len > limit:
        raise ValueError(f"--seq_len {cfg.seq_len} exceeds the backbone's context of {limit} tokens; lower it")
    vocab_size = len(tokenizer)
    special = noise_special_ids(tokenizer, mask_id, backbone.eos_id, backbone.eot_id)

    train_ex, eval_ex = _split_train_eval(cfg, tokenizer)
    world = fabric.world_size
    global_batch = cfg.batch_size * world * cfg.grad_accum
    max_steps = cfg.max_steps or cfg.epochs * max(1, len(train_ex) // global_batch)

    fabric.seed_everything(cfg.seed)
    model.requires_grad_(False)
    lora_trained = cfg.train_mode != "ups_only"
    peft_model = None
    if lora_trained or cfg.load_lora_dir is not None:
        peft_model = _add_lora(cfg, model, backbone.kind, trainable=lora_trained)
    model.train(lora_trained)
    raw_head = _build_head(cfg, model)
    fabric.print(f"Remask SFT ({cfg.train_mode}) on {backbone.name}: {num_parameters(model):,} backbone parameters "
                 f"({num_parameters(model, trainable=True):,} trainable), head {num_parameters(raw_head):,}; "
                 f"{len(train_ex)} train / {0 if eval_ex is None else len(eval_ex)} held-out rows of {cfg.seq_len} "
                 f"tokens, {max_steps} updates of {global_batch} sequences")

    lr_head = cfg.lr if cfg.train_mode == "ups_only" else (cfg.lr_ups or cfg.lr)
    head = fabric.setup_module(raw_head)
    opt_head = fabric.setup_optimizers(torch.optim.AdamW(head.parameters(), lr=lr_head, weight_decay=cfg.weight_decay))
    state = {"head": head, "opt_head": opt_head, "step_count": 0, "iter_num": 0, "tps_updates": 0,
             "ups_updates": 0, "train_args": dataclasses.asdict(cfg)}
    if lora_trained:
        model = fabric.setup_module(model)
        lora_params = [p for p in model.parameters() if p.requires_grad]
        opt_lora = fabric.setup_optimizers(
            torch.optim.AdamW(lora_params, lr=cfg.lr_lora, weight_decay=cfg.weight_decay))
        # checkpoints hold the LoRA weights only (the frozen base comes from --model_name); FSDP shards the
        # parameters, so there the wrapped module is saved whole
        lora_state = model if cfg.strategy == "fsdp" else torch.nn.ParameterList(lora_params)
        state.update(lora=lora_state, opt_lora=opt_lora)
    resume = resume_path(out_dir, cfg.resume)
    if resume is not None:
        load_checkpoint(fabric, resume, state)
        fabric.print(f"Resumed from {resume} at update {state['step_count']}")

    rank, bs = fabric.global_rank, cfg.batch_size

    @lru_cache(maxsize=1)
    def step_plan(step: int):
        """Clean rows and their noise for the whole global batch of update `step` (CPU, same on every rank)."""
        idx = sample_indices(cfg.seed, len(train_ex), step * global_batch, global_batch)
        ids, plen, alen = train_ex.input_ids[idx], train_ex.prompt_len[idx], train_ex.answer_len[idx]
        amask = sft_data.answer_mask(plen, cfg.seq_len)
        noise = apply_remask_noise(ids, amask, mask_id, cfg.r_incorrect, vocab_size, special,
                                   generator=seeded_generator(cfg.seed, STREAM_NOISE, step), eps=cfg.eps)
        return ids, amask, alen, noise

    def micro_batch(step: int, micro: int):
        ids, amask, alen, noise = step_plan(step)
        part = micro * world + rank
        rows = slice(part * bs, (part + 1) * bs)
        to = lambda x: x[rows].to(fabric.device)  # noqa: E731
        ids, noise = to(ids), RemaskBatch(*(to(x) for x in noise))
        if cfg.incorrect_source == "tps":
            with fabric.autocast():
                noise = propose_incorrect(model, ids, noise, mask_id, vocab_size, special,
                                          seeded_generator(cfg.seed, STREAM_PROPOSE, step, part))
        return ids, to(amask), to(alen), noise

    def evaluate() -> dict:
        return evaluate_detection(fabric, model, head, eval_ex, cfg, mask_id, vocab_size, special)

    bar = progress(fabric, total=max_steps, initial=state["step_count"])
    history, last_eval = [], {}
    for step in range(state["step_count"], max_steps):
        kind = step_kind(cfg.train_mode, step, cfg.alt_ratio)
        trained = []  # (module, optimizer, peak lr) updated by this step
        if kind in ("joint", "ups"):
            trained.append((head, opt_head, lr_head))
        if kind in ("joint", "tps"):
            trained.append((model, state["opt_lora"], cfg.lr_lora))
        for _, opt, peak in trained:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, cfg.warmup_steps, max_steps, peak, peak * cfg.min_lr_ratio)
        sums = torch.zeros(5, device=fabric.device)  # total, tps, ups, masked share, incorrect share
        for micro in range(cfg.grad_accum):
            ids, amask, alen, noise = micro_batch(step, micro)
            last_micro = micro == cfg.grad_accum - 1
            with contextlib.ExitStack() as stack:
                for module, _, _ in trained:
                    stack.enter_context(fabric.no_backward_sync(module, enabled=not last_micro))
                with fabric.autocast():
                    losses, _ = remask_forward(model, head, noise, ids, amask, alen, kind, cfg.lambda_ups)
                fabric.backward(_objective(losses, kind) / cfg.grad_accum)
            n_answer = amask.sum().clamp(min=1)
            sums += torch.stack([losses.total.detach(), losses.tps.detach(), losses.ups.detach(),
                                 noise.masked.sum() / n_answer, noise.incorrect.sum() / n_answer]).float()
        for module, opt, _ in trained:
            if cfg.grad_clip > 0:
                fabric.clip_gradients(module, opt, max_norm=cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        state["step_count"] += 1
        state["iter_num"] += cfg.grad_accum
        state["tps_updates"] += kind in ("joint", "tps")
        state["ups_updates"] += kind in ("joint", "ups")
        total, tps, ups, mask_frac, inc_frac = (fabric.all_reduce(sums / cfg.grad_accum, reduce_op="mean")).tolist()
        metrics = {"loss": total, "tps_loss": tps, "ups_loss": ups, "mask_frac": mask_frac, "incorrect_frac": inc_frac,
                   "lr_ups": opt_head.param_groups[0]["lr"], "tps_update": int(kind in ("joint", "tps")),
                   "ups_update": int(kind in ("joint", "ups")), "tps_updates": state["tps_updates"],
                   "ups_updates": state["ups_updates"]}
        if lora_trained:
            metrics["lr_lora"] = state["opt_lora"].param_groups[0]["lr"]
        history.append(total)
        done = state["step_count"] == max_steps
        if eval_ex is not None and (done or (cfg.eval_every and state["step_count"] % cfg.eval_every == 0)):
            last_eval = evaluate()
            metrics.update(last_eval)
            fabric.print(f"update {state['step_count']}: held-out AUC {last_eval['eval_auc']:.4f}, "
                         f"TPS {last_eval['eval_tps_loss']:.4f}, UPS {last_eval['eval_ups_loss']:.4f}")
        fabric.log_dict(metrics, step=state["step_count"])
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", tps=f"{tps:.3f}", ups=f"{ups:.3f}", kind=kind)
        if done or (cfg.save_every and state["step_count"] % cfg.save_every == 0):
            save_checkpoint(fabric, out_dir / checkpoint_name(state["iter_num"]), state)
    bar.close()
    if eval_ex is not None and not last_eval:  # resumed after the last update: report the held-out figures
        last_eval = evaluate()

    head_path = Path(cfg.save_path) if cfg.save_path else out_dir / "ups_head.safetensors"
    lora_dir = (Path(cfg.save_lora_dir) if cfg.save_lora_dir else out_dir / "lora") if lora_trained else None
    if fabric.global_rank == 0:
        meta = {"mask_id": mask_id, "backbone": backbone.name, "backbone_kind": backbone.kind,
                "prompt_template": None if cfg.chat_template else (cfg.prompt_template or format_prompt("{question}")),
                "train_args": dataclasses.asdict(cfg), "updates": state["step_count"], **last_eval}
        save_ups_head(head_path, raw_head, meta)
        if lora_dir is not None:
            peft_model.save_pretrained(str(lora_dir))
        fabric.print(f"UPS head -> {head_path}" + (f", LoRA adapter -> {lora_dir}" if lora_dir else ""))
    fabric.barrier()
    for logger in fabric.loggers:
        logger.finalize("success")
    summary = {"updates": state["step_count"], "tps_updates": state["tps_updates"], "ups_updates": state["ups_updates"],
               "head_path": str(head_path), "lora_dir": None if lora_dir is None else str(lora_dir),
               "metrics_csv": str(Path(fabric.logger.log_dir) / "metrics.csv"), **last_eval}
    fabric.print(json.dumps({k: None if v != v else v for k, v in summary.items()}, indent=2))  # NaN AUC -> null
    return {**summary, "losses": history}


@torch.no_grad()
def evaluate_detection(fabric, model, head, examples, cfg: RemaskConfig, mask_id: int, vocab_size: int,
                       special: list[int]) -> dict:
    """Held-out losses and incorrect-token detection (AUC, precision/recall at sigmoid(h) < 0.5) with the same
    noise (and --incorrect_source) at every call. Every rank evaluates the whole held-out set, so all ranks
    return the same figures."""
    was_training = model.training
    model.eval()
    head.eval()
    amask_all = sft_data.answer_mask(examples.prompt_len, cfg.seq_len)
    noise_all = apply_remask_noise(examples.input_ids, amask_all, mask_id, cfg.r_incorrect, vocab_size, special,
                                   generator=seeded_generator(cfg.seed, STREAM_EVAL, 1), eps=cfg.eps)
    propose_generator = seeded_generator(cfg.seed, STREAM_EVAL, 2)
    scores, labels, tps, ups = [], [], 0.0, 0.0
    n = len(examples)
    for start in range(0, n, cfg.batch_size):
        rows = slice(start, start + cfg.batch_size)
        to = lambda x: x[rows].to(fabric.device)  # noqa: E731
        ids, noise = to(examples.input_ids), RemaskBatch(*(to(x) for x in noise_all))
        with fabric.autocast():
            if cfg.incorrect_source == "tps":
                noise = propose_incorrect(model, ids, noise, mask_id, vocab_size, special, propose_generator)
            losses, ups_logits = remask_forward(model, head, noise, ids, to(amask_all), to(examples.answer_len),
                                                "eval", cfg.lambda_ups)
        k = noise.noisy.shape[0]
        tps += losses.tps.item() * k
        ups += losses.ups.item() * k
        s, y = detection_scores(ups_logits, noise.incorrect, noise.masked, to(amask_all))
        scores.append(s)
        labels.append(y)
    model.train(was_training)
    head.train()
    scores, labels = torch.cat(scores), torch.cat(labels)
    conf = confusion_at(scores, labels, 0.5)
    return {"eval_auc": roc_auc(scores, labels), "eval_tps_loss": tps / n, "eval_ups_loss": ups / n,
            "eval_precision": conf.precision, "eval_recall": conf.recall,
            "eval_incorrect_tokens": int(labels.sum()), "eval_scored_tokens": int(labels.numel())}


def main(argv: Optional[list[str]] = None) -> dict:
    """CLI entry: train, print the summary (rank 0), return the final metrics with the per-update losses."""
    return run(parse_config(argv))


if __name__ == "__main__":
    main()
