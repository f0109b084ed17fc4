"""How well the UPS spots incorrect tokens: ONE held-out measurement, used by the trainer's log and by the report.

Held-out rows are noised as Remask SFT noises them (remedi_patches.noise: mask noise plus incorrect-token noise on
the answer, prompt untouched); the backbone and head run once per batch; every unmasked answer token is scored.
Positive class = incorrect token; UPS score 1 - sigmoid(h); baseline score 1 - p_TPS(token there | x_t), the
signal the sampler's `tps_prob` source uses (remedi_patches.metrics). The same call also gives the held-out TPS
and UPS losses (remedi_patches.losses), so a training log and a report of the same head, rows and settings agree.

The noise comes from ONE CPU generator seeded with `settings.seed`, drawn in a fixed order (all rows' mask and
incorrect noise first, then, for --incorrect_source tps, the proposals batch by batch in row order), so the noise
does not depend on `batch_size`, the device or how often it is called, and the figures only by float rounding.
The report reproduces a training log's eval_* figures when given the same rows (the trainer's --eval_split
records, --max_samples = --eval_samples) and --seed = the training --seed (test_detection.py checks it).

Trainer (held-out evaluation; the keys are metrics.csv's columns):

    from remedi_patches.detection import DetectionSettings, measure_detection

    settings = DetectionSettings(r_incorrect=cfg.r_incorrect, incorrect_source=cfg.incorrect_source, eps=cfg.eps,
                                 seed=cfg.seed, batch_size=cfg.batch_size)
    result = measure_detection(model, head, eval_examples, mask_id=mask_id, vocab_size=len(tokenizer),
                               special_ids=special, settings=settings, autocast=fabric.autocast,
                               device=fabric.device)
    metrics.update(result.metrics())   # eval_auc, eval_tps_auc, eval_tps_loss, eval_ups_loss, eval_precision,
                                       # eval_recall, eval_incorrect_tokens, eval_scored_tokens

Report (records -> rows as training builds them, then the same measurement; ROC / confusion pictures):

    report = ups_detection_report(backbone, head, records, seq_len=128, r_incorrect=0.1, seed=0)
    write_detection_report(report, out_dir)          # roc.png, confusion.png, detection.json

    python -m remedi_patches.detection --ups_head out/remedi/ups_head.safetensors --out_dir out/detection
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Optional

import torch

from remedi_patches import data
from remedi_patches.cli import ArgumentParser, UserError, add_config_args, arg, config_from_args, run_main
from remedi_patches.losses import remask_losses
from remedi_patches.metrics import Confusion, confusion_at, detection_scores, roc_auc, roc_curve, token_prob_scores
from remedi_patches.model_args import add_model_args, model_spec_from_args
from remedi_patches.modeling_wrappers import backbone_forward, load_ups_head
from remedi_patches.noise import (INCORRECT_SOURCES, RemaskBatch, apply_remask_noise, check_noise_settings,
                                  context_incorrect_noise, noise_special_ids, tps_incorrect_noise)
from remedi_patches.trajectory_views import pyplot, save_figure, write_text


@dataclass(frozen=True)
class DetectionSettings:
    """How held-out rows are noised and scored. Set them as the head was trained (detection_settings reads its
    meta); the trainer passes its own --r_incorrect / --incorrect_source / --eps / --seed / --batch_size."""

    r_incorrect: float = arg(0.1, "peak incorrect-token rate r, rho_incorrect(t) = 4 r t (1 - t); report: "
                             "None = the head's training value (else 0.1)", group="detection")
    incorrect_source: str = arg("uniform", "incorrect tokens: 'uniform' over the non-special vocabulary, 'tps' "
                                "(the backbone's own guesses) or 'context' (from the rows' own tokens); report: None = the head's training source (else "
                                "uniform)", choices=INCORRECT_SOURCES, group="detection")
    eps: float = arg(1e-3, "t ~ U(eps, 1) per row; report: None = the head's training eps (else 1e-3)",
                     group="detection")
    t: Optional[float] = arg(None, "one fixed diffusion time for every row; None: t ~ U(eps, 1) per row",
                             group="detection")
    seed: int = arg(0, "seed of the noise (one generator drawn in row order: the result does not depend on "
                    "--batch_size)", group="detection")
    batch_size: int = arg(32, "held-out rows per forward (memory only; the result is the same)", group="detection")
    threshold: float = arg(0.5, "flag a token as incorrect when sigmoid(h) <= threshold (confusion, precision, "
                           "recall)", group="detection")

    def __post_init__(self) -> None:
        check_noise_settings(self.r_incorrect, self.incorrect_source, self.eps)
        if self.t is not None and not 0.0 <= self.t <= 1.0:
            raise ValueError(f"--t must be in [0, 1] (or unset for t ~ U(eps, 1)), got {self.t}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"--threshold must be in (0, 1) (a sigmoid value), got {self.threshold}")


@dataclass(frozen=True)
class Detection:
    """Result of measure_detection (the report adds where the rows came from to `settings`)."""

    auc: float                  # UPS, score 1 - sigmoid(h); nan when only one class is present
    tps_auc: float              # baseline, score 1 - p_TPS(token there)
    confusion: Confusion        # UPS at sigmoid(h) <= threshold  <=>  score >= 1 - threshold
    threshold: float
    n_rows: int                 # held-out rows
    n_scored: int               # unmasked answer tokens
    n_incorrect: int
    tps_loss: float             # held-out TPS loss, mean over rows (losses.tps_loss per row)
    ups_loss: float             # held-out UPS loss, mean over all answer positions (losses.ups_loss)
    roc: tuple[torch.Tensor, torch.Tensor]      # (fpr, tpr) of the UPS
    tps_roc: tuple[torch.Tensor, torch.Tensor]  # (fpr, tpr) of the baseline
    settings: dict

    def metrics(self, prefix: str = "eval_") -> dict:
        """The trainer's held-out metrics (metrics.csv columns)."""
        c = self.confusion
        return {f"{prefix}auc": self.auc, f"{prefix}tps_auc": self.tps_auc, f"{prefix}tps_loss": self.tps_loss,
                f"{prefix}ups_loss": self.ups_loss, f"{prefix}precision": c.precision, f"{prefix}recall": c.recall,
                f"{prefix}incorrect_tokens": self.n_incorrect, f"{prefix}scored_tokens": self.n_scored}

    def to_dict(self) -> dict:
        """JSON-ready (an undefined AUC / precision / recall becomes None)."""
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        c = self.confusion
        return {"auc": clean(self.auc), "tps_auc": clean(self.tps_auc), "threshold": self.threshold,
                "confusion": {"tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn, "precision": clean(c.precision),
                              "recall": clean(c.recall)},
                "n_rows": self.n_rows, "n_scored": self.n_scored, "n_incorrect": self.n_incorrect,
                "tps_loss": clean(self.tps_loss), "ups_loss": clean(self.ups_loss), "settings": self.settings}


@contextlib.contextmanager
def _eval_mode(*modules: torch.nn.Module):
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, training in zip(modules, was):
            m.train(training)


@torch.no_grad()
def measure_detection(model: torch.nn.Module, head: torch.nn.Module, examples: data.SFTExamples, *, mask_id: int,
                      vocab_size: int, special_ids: Iterable[int], settings: DetectionSettings = DetectionSettings(),
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                      device: Optional[torch.device | str] = None) -> Detection:
    """Noise `examples` (held-out rows, remedi_patches.data.SFTExamples) with `settings`, run backbone + head in eval
    mode (restored afterwards) and no grad, and score every unmasked answer token. No I/O.

    model: the backbone (LoRA / Fabric / FSDP wrapped or not); head: the UPS head; mask_id, vocab_size,
    special_ids: as the noise of training used them (remedi_patches.noise.noise_special_ids); autocast: a
    context-manager factory wrapped around every forward (the trainer's fabric.autocast); device: where the rows
    go, default the head's. Every caller (every rank) measures all rows, so all get the same figures.
    """
    n = len(examples)
    if n == 0:
        raise ValueError("no held-out rows to measure detection on; pass at least one record")
    special = list(special_ids)
    device = torch.device(device) if device is not None else next(head.parameters()).device
    ids_all = examples.input_ids
    amask_all = data.answer_mask(examples.prompt_len, ids_all.shape[1])  # (N, L)
    generator = torch.Generator().manual_seed(settings.seed)  # the only source of randomness, drawn in order
    noise_all = apply_remask_noise(ids_all, amask_all, mask_id, settings.r_incorrect, vocab_size, special,
                                   t=settings.t, generator=generator, eps=settings.eps)
    if settings.incorrect_source == "context":  # the pool: every held-out row's x_t
        noise_all = context_incorrect_noise(ids_all, noise_all, mask_id, vocab_size, special, generator)
    ups_scores, tps_scores, labels = [], [], []
    tps_sum, ups_sum = 0.0, 0.0
    with _eval_mode(model, head):
        for start in range(0, n, settings.batch_size):
            rows = slice(start, start + settings.batch_size)
            to = lambda x: x[rows].to(device)  # noqa: E731
            ids, amask, alen = to(ids_all), to(amask_all), to(examples.answer_len)
            part = RemaskBatch(*(to(x) for x in noise_all))
            with autocast():
                if settings.incorrect_source == "tps":
                    part = tps_incorrect_noise(lambda x: backbone_forward(model, x)[0], ids, part, mask_id,
                                               vocab_size, special, generator)
                logits, hidden = backbone_forward(model, part.noisy, None, need_hidden=True)  # (b, L, V), (b, L, d)
                ups_logits = head(hidden)  # (b, L)
            losses = remask_losses(logits, ups_logits, ids, part.noisy, part.masked, part.incorrect, part.p_mask,
                                   amask, alen, lambda_ups=1.0)
            tps_sum += losses.tps.item() * ids.shape[0]   # tps_loss averages over rows
            ups_sum += losses.ups.item() * int(amask.sum())  # ups_loss averages over answer positions
            s, y = detection_scores(ups_logits, part.incorrect, part.masked, amask)
            ups_scores.append(s)
            labels.append(y)
            tps_scores.append(token_prob_scores(logits, part.noisy, part.masked, amask))
    ups_scores, tps_scores, labels = torch.cat(ups_scores), torch.cat(tps_scores), torch.cat(labels)
    fpr, tpr, _ = roc_curve(ups_scores, labels)
    tps_fpr, tps_tpr, _ = roc_curve(tps_scores, labels)
    return Detection(auc=roc_auc(ups_scores, labels), tps_auc=roc_auc(tps_scores, labels),
                     confusion=confusion_at(ups_scores, labels, 1.0 - settings.threshold),
                     threshold=settings.threshold, n_rows=n, n_scored=int(labels.numel()),
                     n_incorrect=int(labels.sum()), tps_loss=tps_sum / n,
                     ups_loss=ups_sum / max(int(amask_all.sum()), 1), roc=(fpr, tpr), tps_roc=(tps_fpr, tps_tpr),
                     settings=dataclasses.asdict(settings))


def ups_detection_report(backbone, head, records, *, seq_len: int = 128, prompt_template: Optional[str] = None,
                         settings: Optional[DetectionSettings] = None,
                         autocast: Callable[[], ContextManager] = contextlib.nullcontext, **overrides) -> Detection:
    """Held-out `records` -> rows as training builds them -> measure_detection.

    backbone: a remedi_patches.backbones.Backbone or EvalModel (.model, .tokenizer, .mask_id, .eos_id, .eot_id);
    head: a UPSHead. records: dicts / a datasets.Dataset with a prompt and an answer field
    (remedi_patches.data.resolve_fields). seq_len, prompt_template: as the head was trained (detection_settings;
    None = the default of remedi_patches.data.build_sft_examples). settings, then `overrides` (DetectionSettings
    fields: r_incorrect, incorrect_source, eps, t, seed, batch_size, threshold) set the measurement.
    """
    settings = dataclasses.replace(settings or DetectionSettings(), **overrides)
    if seq_len < 1:
        raise ValueError(f"--seq_len must be >= 1, got {seq_len}")
    tokenizer = backbone.tokenizer
    fields = data.resolve_fields(data.column_names(records))
    examples = data.build_sft_examples(records, tokenizer, seq_len, fields, prompt_template=prompt_template)
    special = noise_special_ids(tokenizer, backbone.mask_id, backbone.eos_id, backbone.eot_id)
    result = measure_detection(backbone.model, head, examples, mask_id=backbone.mask_id, vocab_size=len(tokenizer),
                               special_ids=special, settings=settings, autocast=autocast)
    return dataclasses.replace(result, settings={
        "records": len(examples), "seq_len": seq_len, "prompt_template": prompt_template,
        "backbone": getattr(backbone, "name", None), **result.settings})


def detection_settings(meta: dict, seq_len: Optional[int] = None, r_incorrect: Optional[float] = None,
                       incorrect_source: Optional[str] = None, eps: Optional[float] = None) -> dict:
    """seq_len, r_incorrect, incorrect_source, eps and prompt format as SMDM/pretrain/train_remedi.py trained the
    head (its save meta), unless given: keyword arguments of ups_detection_report. One prompt rule for every
    dataset, as in training: meta["prompt_template"] ("{question}" placeholder) when present, else the default
    of remedi_patches.data.render_prompt."""
    train = meta.get("train_args") or {}
    return {"seq_len": seq_len or train.get("seq_len") or 128,
            "r_incorrect": r_incorrect if r_incorrect is not None else train.get("r_incorrect", 0.1),
            "incorrect_source": incorrect_source or train.get("incorrect_source", "uniform"),
            "eps": eps if eps is not None else train.get("eps", 1e-3),
            "prompt_template": meta.get("prompt_template")}


# ---------------------------------------------------------------- pictures and files


def plot_roc(report: Detection, path: str | Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot(report.roc[0], report.roc[1], label=f"UPS 1 - sigmoid(h), AUC {report.auc:.3f}")
    ax.plot(report.tps_roc[0], report.tps_roc[1], label=f"TPS 1 - p(token), AUC {report.tps_auc:.3f}", ls="--")
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8)
    ax.set_xlabel("false positive rate (clean tokens flagged)")
    ax.set_ylabel("true positive rate (incorrect tokens flagged)")
    ax.set_title(f"incorrect-token detection, {report.n_incorrect} / {report.n_scored} incorrect")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_confusion(report: Detection, path: str | Path) -> Path:
    plt = pyplot()
    c = report.confusion
    counts = [[c.tp, c.fn], [c.fp, c.tn]]  # rows: truth incorrect / clean; columns: flagged / kept
    rates = [[k / max(sum(row), 1) for k in row] for row in counts]  # colour by share of the true class
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{counts[i][j]}\n{rates[i][j]:.1%}", ha="center", va="center", fontsize=11,
                    color="white" if rates[i][j] > 0.6 else "black")
    ax.set_xticks([0, 1], ["flagged (remask)", "kept"])
    ax.set_yticks([0, 1], ["incorrect", "clean"])
    ax.set_xlabel(f"UPS verdict at sigmoid(h) <= {report.threshold}")
    ax.set_ylabel("truth")
    ax.set_title(f"precision {c.precision:.3f}, recall {c.recall:.3f}")
    return save_figure(fig, path)


def write_detection_report(report: Detection, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {"roc": plot_roc(report, out_dir / "roc.png"),
            "confusion": plot_confusion(report, out_dir / "confusion.png"),
            "json": write_text(out_dir / "detection.json", json.dumps(report.to_dict(), indent=2) + "\n")}


# ---------------------------------------------------------------- CLI


@dataclass(frozen=True)
class ReportConfig:
    """Which held-out records the report measures and where it goes (the model flags: model_args.ModelSpec; how
    the rows are noised and scored: DetectionSettings)."""

    dataset: str = arg("embedded", "held-out records: hub name, local file / folder or 'embedded'")
    split: str = arg("test", "held-out split")
    subset: Optional[str] = arg(None, "hub config / sub-folder")
    max_samples: int = arg(200, "records noised and scored")
    seq_len: Optional[int] = arg(None, "tokens per row; None = the head's training seq_len (else 128)")
    out_dir: str = arg("out/detection", "roc.png, confusion.png, detection.json")

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError(f"--max_samples must be >= 1, got {self.max_samples}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"--seq_len must be >= 1, got {self.seq_len}")
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise NotADirectoryError(f"--out_dir {self.out_dir} is a file; pass a folder for the report")


NONE_MEANS_THE_HEADS = {"r_incorrect": None, "incorrect_source": None, "eps": None}  # report defaults: head meta


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m remedi_patches.detection",
                       description="UPS incorrect-token detection (ROC/AUC, confusion matrix) on held-out noised "
                                   "data: the same measurement as the trainer's held-out eval_auc.")
    add_model_args(p)
    add_config_args(p, ReportConfig, group="held-out data and output")
    add_config_args(p, DetectionSettings, defaults=NONE_MEANS_THE_HEADS)
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.ups_head_path is None:
        raise UserError("--ups_head is required: pass the .safetensors file written by SMDM/pretrain/train_remedi.py")
    cfg = config_from_args(ReportConfig, args)
    unset = {k: getattr(DetectionSettings(), k) for k in NONE_MEANS_THE_HEADS if getattr(args, k) is None}
    config_from_args(DetectionSettings, args, **unset)  # the detection flags given, checked before any file is read
    spec = model_spec_from_args(args)  # paths exist, device usable: checked before anything loads
    _, meta = load_ups_head(spec.ups_head_path)  # small: its training settings, before the backbone loads
    preset = detection_settings(meta, seq_len=cfg.seq_len, r_incorrect=args.r_incorrect,
                                incorrect_source=args.incorrect_source, eps=args.eps)
    settings = config_from_args(DetectionSettings, args, r_incorrect=preset["r_incorrect"],
                                incorrect_source=preset["incorrect_source"], eps=preset["eps"])
    bundle = spec.load()  # backbone, LoRA adapter, head (checked to fit)
    records = data.load_records(cfg.dataset, cfg.split, cfg.subset, limit=cfg.max_samples)
    report = ups_detection_report(bundle, bundle.ups_head, records, seq_len=preset["seq_len"],
                                  prompt_template=preset["prompt_template"], settings=settings)
    report = dataclasses.replace(report, settings={**report.settings, "backbone": spec.model_name or "embedded",
                                                   "ups_head": spec.ups_head_path, "dataset": cfg.dataset,
                                                   "split": cfg.split})
    files = write_detection_report(report, cfg.out_dir)
    print(json.dumps(report.to_dict(), indent=2))
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return report.to_dict()


if __name__ == "__main__":
    run_main(main)
