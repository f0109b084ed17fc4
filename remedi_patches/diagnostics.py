"""Diagnostics a person looks at: what the sampler did, step by step, and how well the UPS spots wrong tokens.

Trajectories (record with `generate(..., trajectory=Trajectory(keep_tokens=True))`):
    trace = row_trace(trajectory, row, answer_start, mask_id)   one row's answer tokens before and after every step
    answer_mask_counts(trace)      masks left in the answer per step (non-increasing: the monotone-noise check)
    step_changes(trace)            per step: tokens committed, tokens re-masked, masks left (block / answer)
    revisions(trace, reference)    every re-masked token and what replaced it; with a reference answer the
                                   "wrong -> re-masked -> corrected" cases are marked `corrected`
    plot_mask_counts / plot_trajectory (PNG, matplotlib Agg), trajectory_html (one self-contained HTML page)

UPS incorrect-token detection on held-out noised data (remedi_patches.noise, remedi_patches.metrics):
    report = ups_detection_report(backbone, head, records, seq_len=128, r_incorrect=0.1)
    write_detection_report(report, out_dir)   roc.png, confusion.png, detection.json
Positive class = incorrect token, score = 1 - sigmoid(h) (UPS) and, as the baseline the sampler's `tps_prob`
source stands for, 1 - p_TPS(token there | x_t). Only unmasked answer tokens are scored.

    python -m remedi_patches.diagnostics --ups_head out/remedi/ups_head.safetensors --out_dir out/diagnostics
"""
from __future__ import annotations

import argparse
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from remedi_patches.metrics import Confusion, confusion_at, roc_auc, roc_curve
from remedi_patches.noise import (INCORRECT_SOURCES, RemaskBatch, apply_remask_noise, noise_special_ids,
                                  tps_incorrect_noise)
from remedi_patches.remasking import Trajectory

MASK_TEXT = "\u25a2"  # a small empty square stands for [MASK]
COLOURS = {  # cell colours of the trajectory pictures
    "mask": "#e4e4e4", "kept": "#ffffff", "right": "#d7f0d2", "wrong": "#f6cccc",
    "committed": "#8cc3ff", "remasked": "#ffb65c",
}


# ---------------------------------------------------------------- trajectories


@dataclass
class RowTrace:
    """One row of a recorded run, cut to its answer: the data behind every trajectory view."""

    states: torch.Tensor  # (S + 1, G) answer tokens before the first step (all masks) and after each of S steps
    block: list[int]      # (S,) block index of each step
    step: list[int]       # (S,) step within its block
    block_masks: list[int]  # (S,) masks left in the current block after each step
    mask_id: int

    @property
    def num_steps(self) -> int:
        return self.states.shape[0] - 1


def row_trace(trajectory: Trajectory, row: int, answer_start: int, mask_id: int) -> RowTrace:
    """Row `row` of a trajectory recorded with keep_tokens=True; answer_start = the padded prompt length."""
    if not trajectory.steps:
        raise ValueError("the trajectory is empty; pass it to generate(..., trajectory=...) before reading it")
    if trajectory.steps[0].tokens is None:
        raise ValueError("the trajectory holds no tokens; record it with Trajectory(keep_tokens=True)")
    rows = trajectory.steps[0].tokens.shape[0]
    if not 0 <= row < rows:
        raise ValueError(f"row {row} is out of range: the trajectory has {rows} rows")
    after = torch.stack([rec.tokens[row, answer_start:] for rec in trajectory.steps])  # (S, G)
    start = torch.full_like(after[:1], mask_id)  # every answer position starts masked
    return RowTrace(states=torch.cat([start, after]), block=[r.block for r in trajectory.steps],
                    step=[r.step for r in trajectory.steps],
                    block_masks=[int(r.mask_count[row]) for r in trajectory.steps], mask_id=mask_id)


def answer_mask_counts(trace: RowTrace) -> list[int]:
    """(S + 1,) masks left in the whole answer, starting with gen_length before the first step."""
    return (trace.states == trace.mask_id).sum(dim=1).tolist()


def is_non_increasing(values: Sequence[float]) -> bool:
    return all(b <= a for a, b in zip(values, values[1:]))


@dataclass
class StepChange:
    index: int                          # 0-based global step
    block: int
    step: int
    committed: list[tuple[int, int]]    # (answer position, token) written at this step
    remasked: list[tuple[int, int]]     # (answer position, token removed) at this step
    block_masks: int                    # masks left in the current block after the step
    answer_masks: int                   # masks left in the whole answer after the step


def step_changes(trace: RowTrace) -> list[StepChange]:
    masked = trace.states == trace.mask_id  # (S + 1, G)
    out = []
    for s in range(trace.num_steps):
        before, after = trace.states[s], trace.states[s + 1]
        committed = (masked[s] & ~masked[s + 1]).nonzero().flatten().tolist()
        remasked = (~masked[s] & masked[s + 1]).nonzero().flatten().tolist()
        out.append(StepChange(s, trace.block[s], trace.step[s], [(p, int(after[p])) for p in committed],
                              [(p, int(before[p])) for p in remasked], trace.block_masks[s],
                              int(masked[s + 1].sum())))
    return out


@dataclass
class Revision:
    """A token that was re-masked, and the token the position got next."""

    position: int
    old: int                # the token that was re-masked
    remasked_at: int        # global step that re-masked it
    new: int                # the next token written at the position (old again, or another one)
    committed_at: Optional[int]  # global step that wrote `new` (None: still masked at the end of the trace)
    kind: str               # corrected | broken | changed | same | open (see revisions)


def revisions(trace: RowTrace, reference: Optional[Sequence[int]] = None) -> list[Revision]:
    """Every re-masking event of the row, in step order. kind: `same` (the same token came back); with a
    reference answer (token ids, position-aligned with the answer) `corrected` (old wrong, new right), `broken`
    (old right, new wrong); else `changed`; `open` if the trace ends before the position is written again."""
    out = []
    for change in step_changes(trace):
        for pos, old in change.remasked:
            later = trace.states[change.index + 1:, pos]  # (S - s,) from the state right after the re-masking
            written = (later != trace.mask_id).nonzero().flatten()
            if written.numel() == 0:  # a trace cut before the end: the position is still masked
                out.append(Revision(pos, old, change.index, trace.mask_id, None, "open"))
                continue
            first = int(written[0])
            new = int(later[first])
            if new == old:
                kind = "same"
            elif reference is not None and pos < len(reference) and new == reference[pos]:
                kind = "corrected"
            elif reference is not None and pos < len(reference) and old == reference[pos]:
                kind = "broken"
            else:
                kind = "changed"
            out.append(Revision(pos, old, change.index, new, change.index + first, kind))
    return out


def token_texts(tokenizer, mask_id: int) -> Callable[[int], str]:
    """id -> a short display string of the token ([MASK] as a square; special tokens kept visible)."""
    def text(token: int) -> str:
        if token == mask_id:
            return MASK_TEXT
        decoded = tokenizer.decode([token], skip_special_tokens=False)
        if decoded and "\ufffd" not in decoded:
            return decoded
        return tokenizer.convert_ids_to_tokens(token) or f"<{token}>"  # a byte piece, or an id beyond the vocab

    return text


def reference_ids(tokenizer, answer: str, gen_length: int, pad_id: Optional[int]) -> list[int]:
    """A reference answer as the model should write it: its tokens, then `pad_id` (EOS) up to gen_length."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:gen_length]
    return ids + [pad_id] * (gen_length - len(ids)) if pad_id is not None else ids


def _cell_kind(trace: RowTrace, s: int, pos: int, reference: Optional[Sequence[int]]) -> str:
    """Category of answer position `pos` in state s (0 = before the first step)."""
    token = int(trace.states[s, pos])
    if s > 0 and token == trace.mask_id and int(trace.states[s - 1, pos]) != trace.mask_id:
        return "remasked"
    if token == trace.mask_id:
        return "mask"
    if s > 0 and int(trace.states[s - 1, pos]) == trace.mask_id:
        return "committed"
    if reference is None or pos >= len(reference):
        return "kept"
    return "right" if token == reference[pos] else "wrong"


# ---------------------------------------------------------------- pictures (matplotlib, Agg)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_mask_counts(traces: dict[str, RowTrace], path: str | Path, title: str = "") -> Path:
    """Two panels over the global step, one line per run: masks left in the answer (must never rise; the
    schedule makes it the same for every source) and tokens re-masked at the step."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for i, (label, trace) in enumerate(traces.items()):
        style = dict(marker=".", ls=("-", "--", ":", "-.")[i % 4], label=label)  # equal curves stay visible
        counts = answer_mask_counts(trace)
        top.plot(range(len(counts)), counts, **style)
        bottom.plot(range(1, len(counts)), [len(c.remasked) for c in step_changes(trace)], **style)
    top.set_ylabel("masks left in the answer")
    top.set_title(title or "mask count per step")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("tokens re-masked")
    bottom.set_xlabel("denoising step")
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def plot_trajectory(trace: RowTrace, text: Callable[[int], str], path: str | Path,
                    reference: Optional[Sequence[int]] = None, title: str = "") -> Path:
    """Steps (rows) x answer positions (columns). Blue: committed at the step; orange: re-masked at the step
    (showing the token removed); grey: [MASK]; green / red: a kept token equal to / different from the
    reference (white without one). Black frames: re-masked positions that ended right (`corrected`)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    plt = _pyplot()
    kinds = list(COLOURS)
    steps, width = trace.states.shape
    grid = [[kinds.index(_cell_kind(trace, s, p, reference)) for p in range(width)] for s in range(steps)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * width + 1.5), max(3.0, 0.3 * steps + 1.5)))
    ax.imshow(grid, cmap=ListedColormap([COLOURS[k] for k in kinds]), vmin=0, vmax=len(kinds) - 1,
              aspect="auto", interpolation="nearest")
    if width <= 96:
        for s in range(steps):
            for p in range(width):
                token = int(trace.states[s, p])
                if grid[s][p] == kinds.index("remasked"):
                    token = int(trace.states[s - 1, p])
                ax.text(p, s, text(token).strip()[:4], ha="center", va="center", fontsize=6)
    for rev in revisions(trace, reference):
        if rev.kind == "corrected":
            height = rev.committed_at - rev.remasked_at + 1  # from the re-masked cell to the corrected one
            ax.add_patch(Rectangle((rev.position - 0.5, rev.remasked_at + 0.5), 1, height, fill=False, lw=1.5,
                                   ec="black"))
    ax.set_xlabel("answer position")
    ax.set_ylabel("after step (0 = start)")
    ax.set_title(title or "denoising trajectory")
    shown = [k for k in kinds if reference is not None or k not in ("right", "wrong")]
    ax.legend(handles=[Patch(facecolor=COLOURS[k], edgecolor="#999", label=k) for k in shown], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return _save(fig, path)


# ---------------------------------------------------------------- HTML


@dataclass
class TraceView:
    """One run of one prompt as the HTML page shows it."""

    title: str
    trace: RowTrace
    text: Callable[[int], str]
    answer: str = ""
    reference: Optional[Sequence[int]] = None
    verdict: Optional[bool] = None  # graded answer, if known


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}h2{margin-top:1.8em}
table.traj{border-collapse:collapse;font-family:monospace;font-size:12px}
table.traj td{border:1px solid #ccc;padding:1px 3px;white-space:pre;text-align:center;min-width:1.2em}
table.traj th{font-weight:normal;color:#777;padding-right:6px;text-align:right;font-size:11px}
td.remasked span{text-decoration:line-through}.legend span{display:inline-block;padding:1px 6px;margin-right:4px;
border:1px solid #ccc;font-size:12px}.corrected{outline:2px solid #000}.ok{color:#1a7f1a}.bad{color:#b00}
pre{background:#f6f6f6;padding:6px}"""


def _legend(with_reference: bool) -> str:
    names = [k for k in COLOURS if with_reference or k not in ("right", "wrong")]
    return "<p class='legend'>" + "".join(f"<span style='background:{COLOURS[k]}'>{k}</span>" for k in names) + \
        "<span class='corrected'>wrong &rarr; re-masked &rarr; corrected</span></p>"


def _trace_table(view: TraceView) -> str:
    trace, ref = view.trace, view.reference
    corrected = {(r.position, s) for r in revisions(trace, ref) if r.kind == "corrected"
                 for s in range(r.remasked_at + 1, r.committed_at + 2)}
    masks = answer_mask_counts(trace)
    lines = ["<table class='traj'>"]
    for s in range(trace.states.shape[0]):
        label = "start" if s == 0 else f"step {s} (block {trace.block[s - 1]})"
        cells = []
        for p in range(trace.states.shape[1]):
            kind = _cell_kind(trace, s, p, ref)
            token = int(trace.states[s - 1, p]) if kind == "remasked" else int(trace.states[s, p])
            cls = kind + (" corrected" if (p, s) in corrected else "")
            cells.append(f"<td class='{cls}' style='background:{COLOURS[kind]}'><span>"
                         f"{html.escape(view.text(token))}</span></td>")
        lines.append(f"<tr><th>{label} ({masks[s]})</th>{''.join(cells)}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _describe(rev: Revision, text: Callable[[int], str]) -> str:
    head = f"{rev.kind}: position {rev.position} {text(rev.old)!r} re-masked at step {rev.remasked_at + 1}"
    if rev.committed_at is None:
        return head + ", still masked at the end"
    return head + f", then {text(rev.new)!r} at step {rev.committed_at + 1}"


def trajectory_html(views: Sequence[TraceView], title: str = "RemeDi denoising trajectories",
                    intro: str = "") -> str:
    """A self-contained page (inline CSS, no scripts or external files): per view a step x position table
    (row label: global step, block, and in brackets the masks left in the answer) and the list of
    re-masking events."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    parts.append(_legend(any(v.reference is not None for v in views)))
    for view in views:
        verdict = "" if view.verdict is None else (" <span class='ok'>correct</span>" if view.verdict
                                                   else " <span class='bad'>wrong</span>")
        parts.append(f"<h2>{html.escape(view.title)}{verdict}</h2><pre>{html.escape(view.answer)}</pre>")
        parts.append(_trace_table(view))
        events = revisions(view.trace, view.reference)
        if events:
            items = "".join(f"<li>{html.escape(_describe(r, view.text))}</li>" for r in events)
            parts.append(f"<details><summary>{len(events)} re-masking events</summary><ul>{items}</ul></details>")
        else:
            parts.append("<p>no token was re-masked</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- UPS incorrect-token detection


@dataclass
class DetectionReport:
    auc: float                  # UPS: score 1 - sigmoid(h)
    tps_auc: float              # baseline: score 1 - p_TPS(token there)
    confusion: Confusion        # UPS at sigmoid(h) <= threshold  <=>  score >= 1 - threshold
    threshold: float
    n_scored: int               # unmasked answer tokens
    n_incorrect: int
    roc: tuple[torch.Tensor, torch.Tensor]      # (fpr, tpr) of the UPS
    tps_roc: tuple[torch.Tensor, torch.Tensor]  # (fpr, tpr) of the baseline
    settings: dict

    def to_dict(self) -> dict:
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        c = self.confusion
        return {"auc": clean(self.auc), "tps_auc": clean(self.tps_auc), "threshold": self.threshold,
                "confusion": {"tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn, "precision": clean(c.precision),
                              "recall": clean(c.recall)},
                "n_scored": self.n_scored, "n_incorrect": self.n_incorrect, "settings": self.settings}


@torch.no_grad()
def ups_detection_report(backbone, head, records, *, seq_len: int = 128, r_incorrect: float = 0.1,
                         batch_size: int = 32, seed: int = 0, threshold: float = 0.5,
                         prompt_template: Optional[str] = None, t: Optional[float] = None,
                         eps: float = 1e-3, incorrect_source: str = "uniform") -> DetectionReport:
    """Noise held-out `records` as Remask SFT does and score every unmasked answer token.

    backbone: a remedi_patches.backbones.Backbone (its .model may be LoRA-wrapped); head: a UPSHead.
    records: dicts / a datasets.Dataset with a prompt and an answer field (remedi_patches.data.resolve_fields).
    seq_len, r_incorrect: as the head was trained (its meta["train_args"]); t: fixed diffusion time, else
    t ~ U(eps, 1) per sequence. prompt_template: as in training (see detection_settings); None = the default
    of remedi_patches.data.build_sft_examples. incorrect_source: 'uniform' or 'tps' (the backbone's own
    guesses, remedi_patches.noise.tps_incorrect_noise), as the head was trained.
    """
    from remedi_patches import data
    from remedi_patches.metrics import detection_scores
    from remedi_patches.modeling_wrappers import backbone_forward

    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if incorrect_source not in INCORRECT_SOURCES:
        raise ValueError(f"incorrect_source must be one of {INCORRECT_SOURCES}, got {incorrect_source!r}")
    tokenizer, model = backbone.tokenizer, backbone.model
    fields = data.resolve_fields(data.column_names(records))
    examples = data.build_sft_examples(records, tokenizer, seq_len, fields, prompt_template=prompt_template)
    answer_mask = data.answer_mask(examples.prompt_len, seq_len)  # (N, L)
    special = noise_special_ids(tokenizer, backbone.mask_id, backbone.eos_id, backbone.eot_id)
    generator = torch.Generator().manual_seed(seed)
    noise = apply_remask_noise(examples.input_ids, answer_mask, backbone.mask_id, r_incorrect, len(tokenizer),
                               special, t=t, generator=generator, eps=eps)
    device = next(head.parameters()).device
    ups_scores, tps_scores, labels = [], [], []
    for start in range(0, len(examples), batch_size):
        rows = slice(start, start + batch_size)
        part = RemaskBatch(*(x[rows] for x in noise))
        if incorrect_source == "tps":  # one generator over the batches in order: same tokens for any batch_size
            part = tps_incorrect_noise(lambda x: backbone_forward(model, x.to(device))[0], examples.input_ids[rows],
                                       part, backbone.mask_id, len(tokenizer), special, generator)
        noisy = part.noisy.to(device)  # (b, L)
        logits, hidden = backbone_forward(model, noisy, None, need_hidden=True)  # (b, L, V), (b, L, d)
        h = head(hidden)  # (b, L)
        there = noisy.clamp(max=logits.shape[-1] - 1)  # the mask id may lie past the logits; masks are not scored
        p_there = logits.float().softmax(-1).gather(-1, there.unsqueeze(-1)).squeeze(-1)  # (b, L)
        s, y = detection_scores(h, part.incorrect, part.masked, answer_mask[rows])
        keep = answer_mask[rows] & ~part.masked
        ups_scores.append(s)
        tps_scores.append((1.0 - p_there.cpu())[keep])
        labels.append(y)
    ups_scores, tps_scores, labels = torch.cat(ups_scores), torch.cat(tps_scores), torch.cat(labels)
    fpr, tpr, _ = roc_curve(ups_scores, labels)
    tps_fpr, tps_tpr, _ = roc_curve(tps_scores, labels)
    settings = {"records": len(examples), "seq_len": seq_len, "r_incorrect": r_incorrect,
                "incorrect_source": incorrect_source, "seed": seed,
                "t": t, "eps": eps, "backbone": getattr(backbone, "name", None)}
    return DetectionReport(auc=roc_auc(ups_scores, labels), tps_auc=roc_auc(tps_scores, labels),
                           confusion=confusion_at(ups_scores, labels, 1.0 - threshold), threshold=threshold,
                           n_scored=int(labels.numel()), n_incorrect=int(labels.sum()), roc=(fpr, tpr),
                           tps_roc=(tps_fpr, tps_tpr), settings=settings)


def plot_roc(report: DetectionReport, path: str | Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot(report.roc[0], report.roc[1], label=f"UPS 1 - sigmoid(h), AUC {report.auc:.3f}")
    ax.plot(report.tps_roc[0], report.tps_roc[1], label=f"TPS 1 - p(token), AUC {report.tps_auc:.3f}", ls="--")
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8)
    ax.set_xlabel("false positive rate (clean tokens flagged)")
    ax.set_ylabel("true positive rate (incorrect tokens flagged)")
    ax.set_title(f"incorrect-token detection, {report.n_incorrect} / {report.n_scored} incorrect")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(report: DetectionReport, path: str | Path) -> Path:
    plt = _pyplot()
    c = report.confusion
    counts = [[c.tp, c.fn], [c.fp, c.tn]]  # rows: truth incorrect / clean; columns: flagged / kept
    rates = [[n / max(sum(row), 1) for n in row] for row in counts]  # colour by share of the true class
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
    return _save(fig, path)


def write_detection_report(report: DetectionReport, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {"roc": plot_roc(report, out_dir / "roc.png"),
            "confusion": plot_confusion(report, out_dir / "confusion.png"),
            "json": write_text(out_dir / "detection.json", json.dumps(report.to_dict(), indent=2) + "\n")}


def detection_settings(meta: dict, seq_len: Optional[int] = None,
                       r_incorrect: Optional[float] = None, incorrect_source: Optional[str] = None) -> dict:
    """seq_len, r_incorrect, incorrect_source and prompt format as SMDM/pretrain/train_remedi.py trained the head
    (its save meta), unless given. One prompt rule for every dataset, as in training: meta["prompt_template"]
    ("{question}" placeholder) when present, else the default of remedi_patches.data.render_prompt."""
    train = meta.get("train_args") or {}
    return {"seq_len": seq_len or train.get("seq_len") or 128,
            "r_incorrect": r_incorrect if r_incorrect is not None else train.get("r_incorrect", 0.1),
            "incorrect_source": incorrect_source or train.get("incorrect_source", "uniform"),
            "prompt_template": meta.get("prompt_template")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="UPS incorrect-token detection (ROC/AUC, confusion matrix) on held-out "
                                "noised data.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name", "--model", dest="model_name", default=None, help="None = the embedded model")
    p.add_argument("--smdm_size", default=None, help="architecture of an SMDM .pth checkpoint")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when the model has none")
    p.add_argument("--lora_path", default=None, help="PEFT LoRA adapter folder")
    p.add_argument("--ups_head", required=True, help="UPS head .safetensors written by train_remedi.py")
    p.add_argument("--dataset", default="embedded", help="held-out records: hub name, local file or 'embedded'")
    p.add_argument("--split", default="test", help="held-out split")
    p.add_argument("--subset", default=None, help="hub config / sub-folder")
    p.add_argument("--max_samples", type=int, default=200, help="records noised and scored")
    p.add_argument("--seq_len", type=int, default=None, help="None = the head's training seq_len (else 128)")
    p.add_argument("--r_incorrect", type=float, default=None, help="None = the head's training r (else 0.1)")
    p.add_argument("--incorrect_source", default=None, choices=INCORRECT_SOURCES,
                   help="None = the head's training source (else uniform)")
    p.add_argument("--batch_size", type=int, default=32, help="rows per forward")
    p.add_argument("--threshold", type=float, default=0.5, help="flag a token when sigmoid(h) <= threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out_dir", default="out/diagnostics", help="roc.png, confusion.png, detection.json")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    from remedi_patches.backbones import load_backbone
    from remedi_patches.data import load_records
    from remedi_patches.modeling_wrappers import check_head_fits, load_lora, load_ups_head

    args = build_parser().parse_args(argv)
    backbone = load_backbone(args.model_name, device=args.device, smdm_size=args.smdm_size, tokenizer=args.tokenizer)
    if args.lora_path:
        backbone.model = load_lora(backbone.model, args.lora_path)
    head, meta = load_ups_head(args.ups_head, map_location=args.device)
    check_head_fits(head, backbone.model)
    report = ups_detection_report(backbone, head, load_records(args.dataset, args.split, args.subset,
                                                               limit=args.max_samples),
                                  **detection_settings(meta, seq_len=args.seq_len, r_incorrect=args.r_incorrect,
                                                       incorrect_source=args.incorrect_source),
                                  batch_size=args.batch_size, seed=args.seed, threshold=args.threshold)
    files = write_detection_report(report, args.out_dir)
    print(json.dumps(report.to_dict(), indent=2))
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return report.to_dict()


if __name__ == "__main__":
    main()
