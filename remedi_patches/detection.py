"""How well the UPS spots incorrect tokens: ONE held-out measurement, used by the trainer's log and by the report.

Held-out rows are built and noised as Remask SFT builds and noises them (remedi_patches.block_layout: the
'sequence' layout [prompt | answer] or the paper's 'block_diffusion' layout [prompt | clean | noisy] with its
block-causal attention and positions, answers EOS-padded to a multiple of --block_length; remedi_patches.noise:
mask noise plus incorrect-token noise on the scored positions, one t per row or, block_diffusion, per answer block);
the model runs once per batch; every unmasked scored token is scored. The UPS logits h come from a UPS head on the
backbone's last hidden state, or, for a dual-stream RemeDi (head None), from the model's own `confidences` of the
same forward. Positive class = incorrect token; UPS score 1 - sigmoid(h); baseline score 1 - p_TPS(token there |
x_t), the signal the sampler's `tps_prob` source uses (remedi_patches.metrics). The same call also gives the
held-out TPS and UPS losses (remedi_patches.losses), so a training log and a report of the same model, rows and
settings agree.

The noise comes from ONE CPU generator seeded with `settings.seed`, drawn in a fixed order (all rows' mask and
incorrect noise first, then, for --incorrect_source tps, the proposals batch by batch in row order), so the noise
does not depend on `batch_size`, the device or how often it is called, and the figures only by float rounding.
The report reproduces a training log's eval_* figures when given the same rows (the trainer's --eval_split
records, --max_samples = --eval_samples) and --seed = the training --seed (test_detection.py checks it).

Trainer (held-out evaluation; the keys are metrics.csv's columns):

    from remedi_patches.detection import DetectionSettings, measure_detection

    settings = DetectionSettings(r_incorrect=cfg.r_incorrect, incorrect_source=cfg.incorrect_source, eps=cfg.eps,
                                 seed=cfg.seed, batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing,
                                 layout=cfg.layout, block_length=cfg.block_length)
    result = measure_detection(model, head, eval_examples, mask_id=mask_id, vocab_size=len(tokenizer),
                               special_ids=special, settings=settings, autocast=fabric.autocast,
                               device=fabric.device, eos_id=eos_id)   # head None: a dual-stream RemeDi
    metrics.update(result.metrics())   # eval_auc, eval_tps_auc, eval_tps_loss, eval_ups_loss, eval_precision,
                                       # eval_recall, eval_incorrect_tokens, eval_scored_tokens

Report (records -> rows as training builds them, then the same measurement; ROC / confusion pictures):

    report = ups_detection_report(backbone, head, records, seq_len=128, r_incorrect=0.1, seed=0)
    write_detection_report(report, out_dir)          # roc.png, confusion.png, detection.json

    python -m remedi_patches.detection --ups_head out/remedi/ups_head.safetensors --out_dir out/detection
    python -m remedi_patches.detection --model out/embedded_remedi --incorrect_source tps   # a dual-stream RemeDi

The report's settings left unset (seq_len, noise, label smoothing, layout, block length, prompt format) are those
the UPS was trained with: the head's save meta, or the model folder's remask_sft.json (MODEL_META_FILE).
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
from remedi_patches.backbones import embedded_folder, max_length_of
from remedi_patches.block_layout import LAYOUTS, build_rows, micro_batch, require_rows_fit
from remedi_patches.cli import ArgumentParser, UserError, add_config_args, arg, config_from_args, run_main
from remedi_patches.losses import remask_losses
from remedi_patches.metrics import Confusion, confusion_at, detection_scores, roc_auc, roc_curve, token_prob_scores
from remedi_patches.model_args import add_model_args, model_spec_from_args
from remedi_patches.modeling_wrappers import has_ups_stream, load_ups_head, ups_input_forward
from remedi_patches.noise import (INCORRECT_SOURCES, RemaskBatch, check_noise_settings, noise_special_ids, remask_noise,
                                  tps_incorrect_noise)
from remedi_patches.trajectory_views import pyplot, save_figure, write_text


@dataclass(frozen=True)
class DetectionSettings:
    """How held-out rows are built, noised and scored. Set them as the head or model was trained
    (detection_settings reads its meta); the trainer passes its own --r_incorrect / --incorrect_source / --eps /
    --seed / --batch_size / --label_smoothing / --layout / --block_length."""

    r_incorrect: float = arg(0.1, "peak incorrect-token rate r, rho_incorrect(t) = 4 r t (1 - t); report: "
                             "None = the training value (else 0.1)", group="detection")
    incorrect_source: str = arg("uniform", "incorrect tokens: 'uniform' over the non-special vocabulary, 'tps' "
                                "(the model's own guesses) or 'context' (from the rows' own tokens); report: None = "
                                "the training source (else uniform)", choices=INCORRECT_SOURCES, group="detection")
    eps: float = arg(1e-3, "t ~ U(eps, 1) per row; report: None = the training eps (else 1e-3)",
                     group="detection")
    t: Optional[float] = arg(None, "one fixed diffusion time for every row (every block); None: t ~ U(eps, 1) per "
                             "row (block_diffusion: per answer block)", group="detection")
    seed: int = arg(0, "seed of the noise (one generator drawn in row order: the result does not depend on "
                    "--batch_size)", group="detection")
    batch_size: int = arg(32, "held-out rows per forward (memory only; the result is the same)", group="detection")
    threshold: float = arg(0.5, "flag a token as incorrect when sigmoid(h) <= threshold (confusion, precision, "
                           "recall)", group="detection")
    label_smoothing: float = arg(0.0, "UPS labels eps of the held-out UPS loss (1 - eps / eps / eps + (1 - 2 eps) "
                                 "p_TPS); report: None = the training value (else 0)", group="detection")
    layout: str = arg("sequence", "held-out rows: 'sequence' [prompt | answer] or the paper's 'block_diffusion' "
                      "[prompt | clean | noisy] with block-causal attention (remedi_patches.block_layout); report: "
                      "None = the training layout (else sequence)", choices=LAYOUTS, group="detection")
    block_length: int = arg(32, "answers are EOS-padded to a multiple of it; block_diffusion: its blocks (one t "
                            "each); report: None = the training value (else 32)", group="detection")

    def __post_init__(self) -> None:
        check_noise_settings(self.r_incorrect, self.incorrect_source, self.eps)
        if self.t is not None and not 0.0 <= self.t <= 1.0:
            raise ValueError(f"--t must be in [0, 1] (or unset for t ~ U(eps, 1)), got {self.t}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.block_length < 1:
            raise ValueError(f"--block_length must be >= 1, got {self.block_length}")
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
    n_scored: int               # unmasked scored (answer) tokens
    n_incorrect: int
    tps_loss: float             # held-out TPS loss, mean over rows (losses.tps_loss per row)
    ups_loss: float             # held-out UPS loss, mean over all scored positions (losses.ups_loss)
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


def rows_eos_id(examples: data.SFTExamples) -> int:
    """The EOS id the SFT rows are padded with (the last column of a row whose answer leaves room)."""
    padded = examples.prompt_len + examples.answer_tokens < examples.input_ids.shape[1]
    if not bool(padded.any()):
        raise ValueError("every held-out row is full, so its EOS padding id is unknown; pass eos_id")
    return int(examples.input_ids[padded, -1][0])


def check_ups_source(model: torch.nn.Module, head: Optional[torch.nn.Module]) -> None:
    """ValueError unless exactly one UPS is at hand: a head on a plain backbone, or a dual-stream model's own."""
    if head is None and not has_ups_stream(model):
        raise ValueError("no UPS to measure: pass a UPS head (train_remedi.py's .safetensors) or a dual-stream RemeDi")
    if head is not None and has_ups_stream(model):
        raise ValueError("a dual-stream RemeDi has its own UPS stream: measure it with head=None (no --ups_head)")


@torch.no_grad()
def measure_detection(model: torch.nn.Module, head: Optional[torch.nn.Module], examples: data.SFTExamples, *,
                      mask_id: int, vocab_size: int, special_ids: Iterable[int],
                      settings: DetectionSettings = DetectionSettings(),
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                      device: Optional[torch.device | str] = None, eos_id: Optional[int] = None) -> Detection:
    """Build `examples` (held-out rows, remedi_patches.data.SFTExamples) into rows of settings.layout, noise them with
    `settings`, run the model (and head) in eval mode (restored afterwards) and no grad, and score every unmasked
    scored token. No I/O.

    model: the backbone (LoRA / Fabric / FSDP wrapped or not), or a dual-stream RemeDi; head: the UPS head, or None
    for a dual-stream RemeDi (its own confidences); mask_id, vocab_size, special_ids: as the noise of training used
    them (remedi_patches.noise.noise_special_ids); autocast: a context-manager factory wrapped around every forward
    (the trainer's fabric.autocast); device: where the rows go, default the head's (else the model's); eos_id: the
    answer and batch padding (None: read from the rows' padding). Every caller (every rank) measures all rows, so
    all get the same figures.
    """
    n = len(examples)
    if n == 0:
        raise ValueError("no held-out rows to measure detection on; pass at least one record")
    check_ups_source(model, head)
    special = list(special_ids)
    modules = [model] if head is None else [model, head]
    device = torch.device(device) if device is not None else next(modules[-1].parameters()).device
    eos = rows_eos_id(examples) if eos_id is None else eos_id
    rows_all = build_rows(examples.input_ids, examples.prompt_len, examples.answer_tokens, settings.layout,
                          settings.block_length, eos)
    require_rows_fit(rows_all.input_ids.shape[1], settings.layout, settings.block_length, max_length_of(model))
    generator = torch.Generator().manual_seed(settings.seed)  # the only source of randomness, drawn in order
    noise_all = remask_noise(rows_all.input_ids, rows_all.answer_mask, rows_all.block_index, settings.layout, mask_id,
                             settings.r_incorrect, vocab_size, special, generator, settings.eps,
                             context=settings.incorrect_source == "context", t=settings.t)
    ups_scores, tps_scores, labels = [], [], []
    tps_sum, ups_sum = 0.0, 0.0
    with _eval_mode(*modules):
        for start in range(0, n, settings.batch_size):
            index = slice(start, start + settings.batch_size)
            rows, part = micro_batch(rows_all, noise_all, index)
            rows, part = rows.to(device), RemaskBatch(*(x.to(device) for x in part))
            with autocast():
                if settings.incorrect_source == "tps":
                    part = tps_incorrect_noise(
                        lambda x: ups_input_forward(model, x, rows.attention_mask, rows.position_ids)[0],
                        rows.input_ids, part, mask_id, vocab_size, special, generator)
                logits, ups_in = ups_input_forward(model, part.noisy, rows.attention_mask, rows.position_ids, True)
                ups_logits = ups_in if head is None else head(ups_in)  # (b, L)
            amask = rows.answer_mask
            losses = remask_losses(logits, ups_logits, rows.input_ids, part.noisy, part.masked, part.incorrect,
                                   part.p_mask, amask, rows.answer_len, lambda_ups=1.0,
                                   label_smoothing=settings.label_smoothing)
            tps_sum += losses.tps.item() * rows.input_ids.shape[0]  # tps_loss averages over rows
            ups_sum += losses.ups.item() * int(amask.sum())  # ups_loss averages over scored positions
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
                     ups_loss=ups_sum / max(int(rows_all.answer_mask.sum()), 1), roc=(fpr, tpr),
                     tps_roc=(tps_fpr, tps_tpr), settings=dataclasses.asdict(settings))


def ups_detection_report(backbone, head, records, *, seq_len: int = 128, prompt_template: Optional[str] = None,
                         settings: Optional[DetectionSettings] = None,
                         autocast: Callable[[], ContextManager] = contextlib.nullcontext, **overrides) -> Detection:
    """Held-out `records` -> rows as training builds them -> measure_detection.

    backbone: a remedi_patches.backbones.Backbone or EvalModel (.model, .tokenizer, .mask_id, .eos_id, .eot_id);
    head: a UPSHead, or None for a dual-stream RemeDi. records: dicts / a datasets.Dataset with a prompt and an
    answer field (remedi_patches.data.resolve_fields). seq_len, prompt_template: as the model was trained
    (detection_settings; None = the default of remedi_patches.data.build_sft_examples). settings, then `overrides`
    (DetectionSettings fields: r_incorrect, incorrect_source, eps, t, seed, batch_size, threshold, label_smoothing,
    layout, block_length) set the measurement.
    """
    settings = dataclasses.replace(settings or DetectionSettings(), **overrides)
    if seq_len < 1:
        raise ValueError(f"--seq_len must be >= 1, got {seq_len}")
    tokenizer = backbone.tokenizer
    fields = data.resolve_fields(data.column_names(records))
    examples = data.build_sft_examples(records, tokenizer, seq_len, fields, prompt_template=prompt_template)
    special = noise_special_ids(tokenizer, backbone.mask_id, backbone.eos_id, backbone.eot_id)
    result = measure_detection(backbone.model, head, examples, mask_id=backbone.mask_id, vocab_size=len(tokenizer),
                               special_ids=special, settings=settings, autocast=autocast, eos_id=backbone.eos_id)
    return dataclasses.replace(result, settings={
        "records": len(examples), "seq_len": seq_len, "prompt_template": prompt_template,
        "backbone": getattr(backbone, "name", None), **result.settings})


TRAINING_DEFAULTS = {"r_incorrect": 0.1, "incorrect_source": "uniform", "eps": 1e-3, "label_smoothing": 0.0,
                     "layout": "sequence", "block_length": 32}  # what a meta without the setting was trained with
MODEL_META_FILE = "remask_sft.json"  # a trained model folder's training settings ({"train_args": ..., ...})


def detection_settings(meta: dict, seq_len: Optional[int] = None, r_incorrect: Optional[float] = None,
                       incorrect_source: Optional[str] = None, eps: Optional[float] = None,
                       label_smoothing: Optional[float] = None, layout: Optional[str] = None,
                       block_length: Optional[int] = None) -> dict:
    """seq_len, the noise (r_incorrect, incorrect_source, eps), label_smoothing, the rows (layout, block_length) and
    the prompt format as Remask SFT trained the head or model (its save meta: meta["train_args"], or "hparams"),
    unless given (not None): keyword arguments of ups_detection_report. A setting the meta lacks gets its value of
    TRAINING_DEFAULTS (seq_len: 128). One prompt rule for every dataset, as in training: meta["prompt_template"]
    ("{question}" placeholder) when present, else the default of remedi_patches.data.render_prompt."""
    train = meta.get("train_args") or meta.get("hparams") or {}
    given = {"r_incorrect": r_incorrect, "incorrect_source": incorrect_source, "eps": eps,
             "label_smoothing": label_smoothing, "layout": layout, "block_length": block_length}
    chosen = {k: v if v is not None else train.get(k, TRAINING_DEFAULTS[k]) for k, v in given.items()}
    return {"seq_len": seq_len or train.get("seq_len") or 128, **chosen, "prompt_template": meta.get("prompt_template")}


def model_meta(model_name: Optional[str]) -> dict:
    """The training meta of a model folder (its MODEL_META_FILE, written by Remask SFT beside the weights), {} when
    there is none (an untrained model, a hub name, the embedded backbone)."""
    path = Path(embedded_folder(model_name) or model_name) / MODEL_META_FILE if model_name is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


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


NONE_MEANS_THE_HEADS = dict.fromkeys(TRAINING_DEFAULTS)  # report defaults: the head's / model's training meta


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m remedi_patches.detection",
                       description="UPS incorrect-token detection (ROC/AUC, confusion matrix) on held-out noised "
                                   "data: the same measurement as the trainer's held-out eval_auc. The UPS: "
                                   "--ups_head on a backbone, or a dual-stream RemeDi's own (--model DIR alone).")
    add_model_args(p)
    add_config_args(p, ReportConfig, group="held-out data and output")
    add_config_args(p, DetectionSettings, defaults=NONE_MEANS_THE_HEADS)
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(ReportConfig, args)
    unset = {k: getattr(DetectionSettings(), k) for k in NONE_MEANS_THE_HEADS if getattr(args, k) is None}
    config_from_args(DetectionSettings, args, **unset)  # the detection flags given, checked before any file is read
    spec = model_spec_from_args(args)  # paths exist, device usable: checked before anything loads
    # small: the training settings of the head, or of a dual-stream model folder, before the model loads
    meta = load_ups_head(spec.ups_head_path)[1] if spec.ups_head_path else model_meta(spec.model_name)
    preset = detection_settings(meta, seq_len=cfg.seq_len, **{k: getattr(args, k) for k in NONE_MEANS_THE_HEADS})
    settings = config_from_args(DetectionSettings, args, **{k: preset[k] for k in NONE_MEANS_THE_HEADS})
    bundle = spec.load()  # backbone, LoRA adapter, head (checked to fit)
    if bundle.ups_head is None and not has_ups_stream(bundle.model):
        raise UserError(f"{spec.model_name or 'the embedded backbone'} has no UPS stream, so --ups_head is required: "
                        "pass the .safetensors file written by SMDM/pretrain/train_remedi.py (or --model a "
                        "dual-stream RemeDi folder)")
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
