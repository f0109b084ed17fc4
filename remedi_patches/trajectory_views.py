"""What the sampler did, step by step: trajectory views a person looks at.

Record a run with `generate(..., trajectory=Trajectory(keep_tokens=True))`, then:
    trace = row_trace(trajectory, row, answer_start, mask_id)   one row's answer tokens before and after every step
    answer_mask_counts(trace)      masks left in the answer per step (non-increasing: the monotone-noise check)
    step_changes(trace)            per step: tokens committed, tokens re-masked, masks left (block / answer)
    step_lines(trace, text)        the same as text: `+pos:'tok'` committed, `-pos:'tok'` re-masked, per step
    trajectory_text(trajectory, answer_start, tokenizer, mask_id)   every row as text, then the calls' cost
                                   (NFE, tokens/s: generate --show_trajectory)
    decoding_text(settings, decoding)   'decoding: llada, cache: dual, threshold 0.9': the decoding and the fast-
                                   decoding settings that are set (the header of generate.py / infer_compare.py)
    revisions(trace, reference)    every re-masked token and what replaced it; with a reference answer the
                                   "wrong -> re-masked -> corrected" cases are marked `corrected`
    plot_mask_counts / plot_trajectory (PNG, matplotlib Agg), trajectory_html (one self-contained HTML page)

infer_compare.py draws these for several confidence sources side by side. How well the UPS spots incorrect tokens
on held-out noised data is measured in remedi_patches.detection.
"""
from __future__ import annotations

import html
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import FAST_DECODING_FIELDS

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


def _is_committed(trace: RowTrace, s: int, pos: int) -> bool:
    """Position `pos` was masked before step s and holds a token after it."""
    return s > 0 and int(trace.states[s - 1, pos]) == trace.mask_id and int(trace.states[s, pos]) != trace.mask_id


def _cell_kind(trace: RowTrace, s: int, pos: int, reference: Optional[Sequence[int]]) -> str:
    """Fill category of answer position `pos` in state s (0 = before the first step). With a reference, every
    token on the canvas, the ones committed at this step included (so the final answer row reads right / wrong
    throughout), is `right` or `wrong`; the commit itself is then marked by a frame (see _is_committed).
    Without one a token just committed is `committed`, an older one `kept`."""
    token = int(trace.states[s, pos])
    if s > 0 and token == trace.mask_id and int(trace.states[s - 1, pos]) != trace.mask_id:
        return "remasked"
    if token == trace.mask_id:
        return "mask"
    if reference is None or pos >= len(reference):
        return "committed" if _is_committed(trace, s, pos) else "kept"
    return "right" if token == reference[pos] else "wrong"


def step_lines(trace: RowTrace, text: Callable[[int], str]) -> list[str]:
    """One text line per step: `+pos:'tok'` for each token committed, `-pos:'tok'` for each token re-masked (the
    token removed), and the masks left in the block / answer. Positions count from the start of the answer."""
    lines = []
    for c in step_changes(trace):
        added = " ".join(f"+{p}:{text(t)!r}" for p, t in c.committed) or "-"
        removed = " ".join(f"-{p}:{text(t)!r}" for p, t in c.remasked) or "-"
        lines.append(f"  step {c.index + 1:3d} (block {c.block} step {c.step + 1}): masks {c.block_masks} in block, "
                     f"{c.answer_masks} in answer | committed {added} | re-masked {removed}")
    return lines


def trajectory_text(trajectory: Trajectory, answer_start: int, tokenizer, mask_id: int) -> str:
    """Every row of a run recorded with Trajectory(keep_tokens=True), as text: a `row N` header, then
    step_lines with the tokens decoded by `tokenizer`, and last the sampler calls' cost (`cost: NFE 6, 812.4
    tokens/s`, remasking.Trajectory.cost) when the trajectory counted a call (what `generate.py --show_trajectory`
    prints)."""
    text = token_texts(tokenizer, mask_id)
    rows = trajectory.steps[0].tokens.shape[0] if trajectory.steps and trajectory.steps[0].tokens is not None else 1
    lines = []
    for row in range(rows):
        lines.append(f"row {row}:")
        lines.extend(step_lines(row_trace(trajectory, row, answer_start, mask_id), text))
    if trajectory.calls:
        lines.append(f"cost: {trajectory.cost()}")
    return "\n".join(lines)


def decoding_text(settings, decoding: str) -> str:
    """'decoding: llada, cache: dual, threshold 0.9': the decoding a sampler call uses (sampling.decoding_of), its
    sampling method when one is set, and the fast-decoding settings of `settings` (a sampling.SamplerSettings) that
    are set."""
    parts = [f"decoding: {decoding}"]
    if getattr(settings, "method", None) is not None:
        parts.append(f"method: {settings.method}")
    for name in FAST_DECODING_FIELDS:
        value = getattr(settings, name, None)
        if value is not None:
            parts.append(f"cache: {value}" if name == "cache" else f"{name} {value:g}")
    return ", ".join(parts)


# ---------------------------------------------------------------- pictures (matplotlib, Agg)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_mask_counts(traces: dict[str, RowTrace], path: str | Path, title: str = "") -> Path:
    """Two panels over the global step, one line per run: masks left in the answer (must never rise; the
    schedule makes it the same for every source) and tokens re-masked at the step."""
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_trajectory(trace: RowTrace, text: Callable[[int], str], path: str | Path,
                    reference: Optional[Sequence[int]] = None, title: str = "") -> Path:
    """Steps (rows) x answer positions (columns). Green / red: a token equal to / different from the reference,
    whether kept or committed at the step (so the last row is the graded answer); a blue frame marks a token
    committed at the step (without a reference: blue fill; older tokens white); orange: re-masked at the step
    (showing the token removed); grey: [MASK]. Black frames: re-masked positions that ended right (`corrected`)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    plt = pyplot()
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
    if reference is not None:
        for s in range(steps):
            for p in range(width):
                if _is_committed(trace, s, p):
                    ax.add_patch(Rectangle((p - 0.42, s - 0.42), 0.84, 0.84, fill=False, lw=1.2,
                                           ec=COLOURS["committed"]))
    for rev in revisions(trace, reference):
        if rev.kind == "corrected":
            height = rev.committed_at - rev.remasked_at + 1  # from the re-masked cell to the corrected one
            ax.add_patch(Rectangle((rev.position - 0.5, rev.remasked_at + 0.5), 1, height, fill=False, lw=1.5,
                                   ec="black"))
    ax.set_xlabel("answer position")
    ax.set_ylabel("after step (0 = start)")
    ax.set_title(title or "denoising trajectory")
    shown = [k for k in kinds if k not in ("right", "wrong", "committed", "kept") or
             (k in ("right", "wrong")) == (reference is not None)]
    handles = [Patch(facecolor=COLOURS[k], edgecolor="#999", label=k) for k in shown]
    if reference is not None:
        handles.append(Patch(facecolor="white", edgecolor=COLOURS["committed"], lw=1.2, label="committed at step"))
    ax.legend(handles=handles, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return save_figure(fig, path)


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
    names = [k for k in COLOURS if (k not in ("right", "wrong", "committed", "kept")) or
             (k in ("right", "wrong")) == with_reference]
    spans = "".join(f"<span style='background:{COLOURS[k]}'>{k}</span>" for k in names)
    if with_reference:
        spans += f"<span style='box-shadow:inset 0 0 0 2px {COLOURS['committed']}'>committed at this step</span>"
    return f"<p class='legend'>{spans}<span class='corrected'>wrong &rarr; re-masked &rarr; corrected</span></p>"


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
            style = f"background:{COLOURS[kind]}"
            if kind != "committed" and _is_committed(trace, s, p):  # right / wrong fill, commit shown by a frame
                cls += " new"
                style += f";box-shadow:inset 0 0 0 2px {COLOURS['committed']}"
            cells.append(f"<td class='{cls}' style='{style}'><span>"
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
    """Write UTF-8 `text` to a temporary file of this process beside `path` (parents created), then rename it into
    place: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
