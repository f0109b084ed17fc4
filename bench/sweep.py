"""Sweep runner: Remask SFT (SMDM/pretrain/train_remedi.py, remedi_patches.remask_sft) over a grid of trainer
settings; every point is trained, evaluated on held-out problems and tabulated, with one plot panel per swept flag.

    python bench/sweep.py --out_dir out/sweep --grid r_incorrect=0.05,0.1,0.2 --grid lambda_ups=0.5,1,2 \\
        --grid ups_width=0,128,512 --grid seq_len=72,96          # one at a time from the trainer's defaults
    python bench/sweep.py --mode full --grid r_incorrect=0.05,0.2 --grid lambda_ups=0.5,2 --base max_steps=200

--grid NAME=V1,V2,... sweeps any trainer flag (a RemaskConfig field, as `train_remedi.py --NAME`); --base NAME=V
fixes one for every point. --mode one_at_a_time (the ablation style): the base point, then each swept flag's other
values with every other flag at its base value (--base, else the trainer's default for the model); full: the
cartesian product. Every point's settings are checked (RemaskConfig.check) before the first one trains.

Per point, under --out_dir/points/<name> (name: the point's swept settings, e.g. `r_incorrect=0.05`; `base`):
the trainer's outputs (checkpoints, logs, head), train.json (its summary: held-out incorrect-token detection AUC of
the UPS and of 1 - p_TPS on noised data, the seconds it took), predictions.jsonl (eval_gsm_math rows) and
point.json (the point's results). A re-run skips points with a point.json, evaluates points with only a train.json
and resumes a killed training from its newest checkpoint; a point folder written with other settings is refused.

Evaluation: the first --n_eval problems of --eval_split (the embedded task's test split by default; never the
training split) decoded by eval_gsm_math.evaluate with each --sources source (default ups) at every --steps
budget: exact match of the final answer (accuracy) and token-level accuracy on the answer span (token_accuracy,
remedi_patches.metrics.answer_token_accuracy). --baseline sources (default tps_prob) run once per sweep on the
untrained base model (under --out_dir/baseline): with the backbone frozen (ups_only) they are the same for
every point.

Writes --out_dir/results.csv and results.md (one row per point and source; the command, machine and wall time;
one_at_a_time: per budget the sign-test p of each point's exact-match verdicts against the base point's on the
same problems, so a gap within the noise of --n_eval problems reads as such) and sweep.png (one panel per swept
flag: accuracy, token accuracy and the UPS AUC against the flag's value; in full mode the mean over the other
flags' values; the baseline as dotted lines).
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import itertools
import json
import logging
import math
import os
import platform
import re
import shlex
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from bench_embedded_accuracy import sign_test
from eval_gsm_math import FORMATS, evaluate, make_items, parse_runs, write_jsonl
from remedi_patches.cli import ArgumentParser, UserError, unwrap_optional, run_main
from remedi_patches.data import load_records
from remedi_patches.model_args import ModelSpec
from remedi_patches.remask_sft import RemaskConfig, run
from remedi_patches.run_lock import RunLock
from remedi_patches.sampling import SamplerSettings
from remedi_patches.trajectory_views import pyplot, save_figure, write_text

log = logging.getLogger("sweep")
TRAINER = "SMDM/pretrain/train_remedi.py"
MODES = ("one_at_a_time", "full")
SET_BY_SWEEP = ("out_dir", "save_path", "save_lora_dir", "save_model_dir", "resume")  # per point, by the sweep
BASE_NAME = "base"
BASELINE_DIR = "baseline"
TRAIN_KEYS = ("updates", "eval_auc", "eval_tps_auc")  # from the trainer's summary into the results


# ---------------------------------------------------------------- flags of the trainer and their values


def trainer_fields() -> dict[str, type]:
    """The trainer flags a sweep may set: RemaskConfig's command-line fields -> their value type."""
    hints = typing.get_type_hints(RemaskConfig)
    return {f.name: unwrap_optional(hints[f.name]) for f in dataclasses.fields(RemaskConfig)
            if f.metadata and f.metadata.get("cli", True) and f.name not in SET_BY_SWEEP}


def parse_value(name: str, text: str, flag: str) -> Any:
    """One flag value from the command line as the trainer's field type (None for an optional field: 'none')."""
    tp = trainer_fields()[name]
    field = next(f for f in dataclasses.fields(RemaskConfig) if f.name == name)
    if text.lower() == "none" and field.default is None:
        return None
    try:
        if tp is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            value = text.lower() in ("true", "1")
        else:
            value = tp(text)
    except (TypeError, ValueError):
        raise UserError(f"{flag}: {text!r} is not a value of {name} ({getattr(tp, '__name__', tp)}); see "
                        f"{TRAINER} --help") from None
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"{flag}: {name} must be one of {list(choices)}, got {text!r}")
    return value


def parse_setting(text: str, flag: str, many: bool) -> tuple[str, list]:
    """'NAME=V1,V2' (--grid, many) or 'NAME=V' (--base) -> (NAME, values), NAME checked against the trainer's."""
    name, sep, values = text.partition("=")
    name = name.strip().lstrip("-")
    if not sep or not values.strip():
        raise UserError(f"{flag} {text!r}: write NAME={'V1,V2,...' if many else 'VALUE'}, e.g. "
                        f"{'r_incorrect=0.05,0.1,0.2' if many else 'max_steps=200'}")
    if name in SET_BY_SWEEP:
        raise UserError(f"{flag} {text!r}: {name} is set by the sweep for every point (under --out_dir); drop it")
    fields = trainer_fields()
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"{flag} {text!r}: {name!r} is no flag of {TRAINER}; {hint}see {TRAINER} --help")
    parts = [v.strip() for v in values.split(",")] if many else [values.strip()]
    parsed = [parse_value(name, v, f"{flag} {text}") for v in parts]
    if len(set(map(repr, parsed))) != len(parsed):
        raise UserError(f"{flag} {text!r}: each value once")
    return name, parsed


def parse_grid(texts: Sequence[str]) -> dict[str, list]:
    """--grid NAME=V1,V2,... (each flag once) -> {NAME: [values]} in the order given."""
    grid: dict[str, list] = {}
    for text in texts:
        name, values = parse_setting(text, "--grid", many=True)
        if name in grid:
            raise UserError(f"--grid names {name} twice; give all its values in one --grid {name}=V1,V2,...")
        grid[name] = values
    if not grid:
        raise UserError("nothing to sweep: pass at least one --grid NAME=V1,V2,...")
    return grid


def parse_base(texts: Sequence[str], grid: dict[str, list], mode: str) -> dict[str, Any]:
    """--base NAME=V -> {NAME: V}; in full mode a swept flag cannot also be fixed."""
    base: dict[str, Any] = {}
    for text in texts:
        name, (value,) = parse_setting(text, "--base", many=False)
        if name in base:
            raise UserError(f"--base sets {name} twice; keep one")
        if mode == "full" and name in grid:
            raise UserError(f"--base {text}: {name} is swept by --grid in full mode; drop one of them")
        base[name] = value
    return base


# ---------------------------------------------------------------- points


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def point_name(overrides: dict[str, Any]) -> str:
    """The folder name of a point: its swept settings `NAME=V` joined by '__' ('base' for none), characters
    outside [A-Za-z0-9._=+-] written '_'."""
    if not overrides:
        return BASE_NAME
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(f"{k}={format_value(v)}" for k, v in overrides.items()))


def base_values(grid: dict[str, list], base: dict[str, Any]) -> dict[str, Any]:
    """Each swept flag's value at the base point: --base, else the trainer's default resolved for the model."""
    resolved = RemaskConfig(**base).resolve_defaults()
    return {name: getattr(resolved, name) for name in grid}


def make_points(grid: dict[str, list], base: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """The points' overrides of --base, in run order. one_at_a_time: {} (the base point) first, then one flag at a
    time at each of its values other than its base value; full: every combination."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {MODES}, got {mode!r}")
    if mode == "full":
        return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    at_base = base_values(grid, base)
    return [{}] + [{name: v} for name, values in grid.items() for v in values if v != at_base[name]]


def point_config(base: dict[str, Any], overrides: dict[str, Any], out_dir: Path) -> RemaskConfig:
    """The checked trainer config of one point (UserError naming the point for bad settings)."""
    name = point_name(overrides)
    try:
        return RemaskConfig(**{**base, **overrides, "out_dir": str(out_dir / "points" / name)}).check()
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"sweep point {name}: {err}") from None


def settings_of(cfg: RemaskConfig) -> dict:
    """The trainer settings a point folder is tied to (JSON-safe; its out_dir apart)."""
    settings = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    settings.pop("out_dir")
    return settings


def eval_settings_of(args) -> dict:
    """The evaluation settings a point's results are tied to."""
    return {k: getattr(args, k) for k in ("n_eval", "eval_split", "format", "sources", "baseline", "steps",
                                          "gen_length", "block_length", "seed")}


def read_record(path: Path, settings: dict) -> Optional[dict]:
    """A point's saved train.json / point.json, None if absent; UserError if its trainer settings differ."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    saved = record.get("settings") or {}
    if saved != settings:
        changed = sorted(k for k in set(settings) | set(saved) if saved.get(k) != settings.get(k))
        raise UserError(f"{path} was written with other trainer settings ({', '.join(changed)} differ); pass a new "
                        "--out_dir, or delete that point's folder to redo it")
    return record


# ---------------------------------------------------------------- training and evaluation


def train_point(cfg: RemaskConfig, settings: dict) -> dict:
    """The trainer's summary of the point (without its per-update losses), training it unless train.json holds
    it; a killed training resumes from its newest checkpoint (--resume auto)."""
    path = Path(cfg.out_dir) / "train.json"
    done = read_record(path, settings)
    if done is not None:
        return done
    start = time.perf_counter()
    summary = {k: v for k, v in run(cfg).items() if k != "losses"}
    record = {**summary, "train_seconds": time.perf_counter() - start, "settings": settings}
    write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return record


def eval_model(cfg: RemaskConfig, summary: Optional[dict]) -> ModelSpec:
    """The model to decode with: the trained one (`summary` of train_point: its model folder, head, adapter), or the
    untrained base model (summary None)."""
    trained = summary or {}
    return ModelSpec(model_name=trained.get("model_dir") or cfg.model_name, smdm_size=cfg.smdm_size,
                     tokenizer=cfg.tokenizer, ups_head_path=trained.get("head_path"),
                     lora_path=trained.get("lora_dir") or cfg.load_lora_dir,
                     device="cpu" if cfg.accelerator == "cpu" else "auto").check()


def decode(spec: ModelSpec, items, sources: Sequence[str], budgets: dict[int, SamplerSettings], args) -> tuple:
    """Every source at every budget -> (rows tagged with `steps`, {f'{metric}@{steps}': value} per source)."""
    em = spec.load()
    runs = parse_runs(sources)
    rows, results = [], {run.label: {} for run in runs}
    for steps, settings in budgets.items():
        budget_rows, summary = evaluate(em, items, runs, settings, fmt=args.format, batch_size=args.infer_bs,
                                        seed=args.seed, progress=False)
        rows += [{**r, "steps": steps} for r in budget_rows]
        for r in summary["results"]:
            results[r["source"]].update({f"accuracy@{steps}": r["accuracy"],
                                         f"token_accuracy@{steps}": r["token_accuracy"]})
    return rows, results


def run_point(cfg: RemaskConfig, name: str, overrides: dict, items, budgets, args, trained: bool) -> list[dict]:
    """One point (trained=False: the baseline on the untrained model) -> its results rows, one per source;
    skipped when its point.json holds results of the same evaluation settings (else evaluated again)."""
    folder = Path(cfg.out_dir)
    settings, evaluation = settings_of(cfg), eval_settings_of(args)
    done = read_record(folder / "point.json", settings)
    if done is not None and done.get("eval") == evaluation:
        log.info("%s: done before, skipped", name)
        return done["results"]
    summary = train_point(cfg, settings) if trained else None
    start = time.perf_counter()
    rows, results = decode(eval_model(cfg, summary), items, args.sources if trained else args.baseline, budgets, args)
    seconds = time.perf_counter() - start
    train = {k: (summary or {}).get(k) for k in TRAIN_KEYS}
    out = [{"point": name, "source": source, **overrides, **train, **metrics,
            "train_seconds": None if summary is None else summary["train_seconds"], "eval_seconds": seconds}
           for source, metrics in results.items()]
    write_jsonl(folder / "predictions.jsonl", rows)
    write_text(folder / "point.json", json.dumps({"results": out, "settings": settings, "eval": evaluation},
                                                indent=2) + "\n")
    return out


# ---------------------------------------------------------------- tables and plots


def result_columns(grid: dict[str, list], steps: Sequence[int], paired: bool) -> list[str]:
    names = ("accuracy", "token_accuracy", "p_vs_base") if paired else ("accuracy", "token_accuracy")
    metrics = [f"{m}@{s}" for s in steps for m in names]
    return ["point", "source", *grid, *TRAIN_KEYS, *metrics, "train_seconds", "eval_seconds"]


def correct_by_problem(folder: Path) -> dict[tuple[str, int], dict[int, bool]]:
    """{(source, steps): {problem index: correct}} from a point's predictions.jsonl (empty if it has none)."""
    path = folder / "predictions.jsonl"
    out: dict[tuple[str, int], dict[int, bool]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        out.setdefault((row["source"], row["steps"]), {})[row["index"]] = bool(row["correct"])
    return out


def add_paired(rows: list[dict], folders: dict[str, Path], steps: Sequence[int], first_source: str) -> list[dict]:
    """Each row with p_vs_base@S: the exact two-sided sign test of its exact-match verdicts against the base
    point's on the same problems (problems only one of them solves; the same source, for the baseline rows the
    base point's first --sources source); None for the base point itself."""
    base = correct_by_problem(folders[BASE_NAME])
    out = []
    for r in rows:
        mine = correct_by_problem(folders[r["point"]])
        against = first_source if r["point"] == BASELINE_DIR else r["source"]
        extra = {}
        for s in steps:
            a, b = mine.get((r["source"], s), {}), base.get((against, s), {})
            shared = [i for i in a if i in b]
            wins, losses = sum(a[i] and not b[i] for i in shared), sum(b[i] and not a[i] for i in shared)
            extra[f"p_vs_base@{s}"] = None if r["point"] == BASE_NAME or not shared else sign_test(wins, losses)
        out.append({**r, **extra})
    return out


def complete_rows(rows: list[dict], grid: dict[str, list], at_base: dict[str, Any]) -> list[dict]:
    """Each row with every swept flag's value filled in (the base value where the point did not set it)."""
    return [{**r, **{k: r.get(k, at_base[k]) for k in grid}} for r in rows]


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if r.get(k) is None else r.get(k) for k in columns} for r in rows])
    return buf.getvalue()


def markdown_results(rows: list[dict], columns: list[str], grid: dict[str, list]) -> str:
    def cell(column: str, value) -> str:
        if value is None:
            return "-"
        if column.endswith("_seconds"):
            return f"{value:.0f}"
        return f"{value:.3f}" if isinstance(value, float) and column not in grid else format_value(value)

    head = [c.replace("token_accuracy", "token acc.").replace("p_vs_base", "p vs base").replace("eval_auc", "UPS AUC")
            .replace("eval_tps_auc", "1 - p_TPS AUC").replace("_seconds", " s") for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(columns) - 2)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def panel_series(rows: list[dict], flag: str, grid: dict[str, list], mode: str, metric: str) -> tuple[list, list]:
    """(values of `flag`, `metric` at each) over the trained points: one_at_a_time the points where only `flag`
    moves from the base (the base point included); full the mean over the other flags' values."""
    if mode == "one_at_a_time":
        chosen = [r for r in rows if r["point"] == BASE_NAME or point_name({flag: r[flag]}) == r["point"]]
    else:
        chosen = rows
    xs, ys = [], []
    for value in sorted({r[flag] for r in chosen}, key=lambda v: (v is None, v if v is not None else 0)):
        got = [r[metric] for r in chosen if r[flag] == value and r.get(metric) is not None]
        if got:
            xs.append(value)
            ys.append(sum(got) / len(got))
    return xs, ys


def plot_sweep(rows: list[dict], baseline: list[dict], grid: dict[str, list], mode: str, steps: Sequence[int],
               path: Path) -> Path:
    """One panel per swept flag: accuracy (solid) and token accuracy (dashed) per budget, the UPS AUC (black), the
    baseline sources' accuracy as dotted lines; x is the flag's value (categorical when not numeric); one y range
    for all panels, from just under the lowest value to 1."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(grid), figsize=(4.2 * len(grid), 3.6), squeeze=False, sharey=True)
    lowest = 1.0
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, flag in zip(axes[0], grid):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grid[flag])
        position = (lambda v: v) if numeric else (lambda v: [format_value(x) for x in grid[flag]].index(
            format_value(v)))
        for k, s in enumerate(steps):
            colour = colours[k % len(colours)]
            for metric, style, label in ((f"accuracy@{s}", "-o", f"accuracy, {s} steps"),
                                         (f"token_accuracy@{s}", "--s", f"token acc., {s} steps")):
                xs, ys = panel_series(rows, flag, grid, mode, metric)
                ax.plot([position(x) for x in xs], ys, style, color=colour, label=label)
                lowest = min([lowest, *ys])
            for b in baseline:
                if b.get(f"accuracy@{s}") is not None:
                    lowest = min(lowest, b[f"accuracy@{s}"])
                    ax.axhline(b[f"accuracy@{s}"], color=colour, linestyle=":", linewidth=1,
                               label=f"{b['source']} accuracy, {s} steps")
        xs, ys = panel_series(rows, flag, grid, mode, "eval_auc")
        ax.plot([position(x) for x in xs], ys, "-^", color="black", label="UPS detection AUC")
        lowest = min([lowest, *ys])
        if not numeric:
            ax.set_xticks(range(len(grid[flag])), [format_value(v) for v in grid[flag]])
        ax.set_xlabel(flag)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylim(max(0.0, math.floor((lowest - 0.05) * 10) / 10), 1.02)
    axes[0][0].set_ylabel("held-out metric")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.12 if len(labels) > 4 else 0.08, 1, 1))
    return save_figure(fig, path)


# ---------------------------------------------------------------- command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help=f"a trainer flag of {TRAINER} and the values it takes (repeat per flag)")
    p.add_argument("--base", action="append", default=[], metavar="NAME=VALUE",
                   help="a trainer flag fixed for every point (repeat per flag); the rest keep the trainer's defaults")
    p.add_argument("--mode", choices=MODES, default="one_at_a_time",
                   help="vary one flag at a time from the base settings, or every combination")
    p.add_argument("--out_dir", type=Path, default=Path("out/sweep"), help="points/, baseline/, results.*, sweep.png")
    e = p.add_argument_group("evaluation")
    e.add_argument("--n_eval", type=int, default=200, help="held-out problems decoded per point, source and budget")
    e.add_argument("--eval_split", default="test", help="held-out split of the trainer's --dataset")
    e.add_argument("--format", choices=FORMATS, default="gsm8k", help="grader of eval_gsm_math")
    e.add_argument("--sources", nargs="+", default=["ups"], help="confidence sources decoded at every point")
    e.add_argument("--baseline", nargs="*", default=["tps_prob"],
                   help="sources decoded once, on the untrained base model (none: skip)")
    e.add_argument("--steps", type=int, nargs="+", default=[32, 8], help="step budgets")
    e.add_argument("--gen_length", type=int, default=32, help="answer tokens per problem")
    e.add_argument("--block_length", type=int, default=32, help="semi-autoregressive block size")
    e.add_argument("--infer_bs", type=int, default=50, help="problems per sampler call")
    e.add_argument("--seed", type=int, default=0, help="torch.manual_seed before each source")
    return p


def parse_args(argv: Optional[list[str]] = None):
    """Parsed flags with every point's trainer config and the budgets checked, before anything trains."""
    args = build_parser().parse_args(argv)
    for flag in ("n_eval", "infer_bs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise NotADirectoryError(f"--out_dir {args.out_dir} is a file; pass a folder")
    args.grid_values = parse_grid(args.grid)
    args.base_values = parse_base(args.base, args.grid_values, args.mode)
    args.points = make_points(args.grid_values, args.base_values, args.mode)
    args.configs = [point_config(args.base_values, o, args.out_dir) for o in args.points]
    names = [point_name(o) for o in args.points]
    if len(set(names)) != len(names):
        raise UserError(f"two points share a folder name ({names}); use values that differ in letters and digits")
    if args.eval_split == args.configs[0].split:
        raise UserError(f"--eval_split {args.eval_split} is the split the trainer trains on; evaluate on held-out "
                        "problems (e.g. --eval_split test)")
    parse_runs(args.sources)
    if args.baseline:
        parse_runs(args.baseline)
    args.budgets = {s: SamplerSettings(steps=s, gen_length=args.gen_length, block_length=args.block_length)
                    for s in args.steps}  # ValueError for a budget that does not fit gen_length / block_length
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with RunLock(args.out_dir):
        return sweep(args, argv)


def sweep(args, argv: Optional[list[str]]) -> dict:
    start = time.perf_counter()
    base_cfg = args.configs[0] if args.mode == "one_at_a_time" else point_config(args.base_values, {}, args.out_dir)
    records = load_records(base_cfg.dataset, args.eval_split, base_cfg.subset, limit=args.n_eval)
    items = make_items(records, args.format, base_cfg.prompt_template, base_cfg.prompt_field, base_cfg.answer_field)
    rows = []
    for overrides, cfg in tqdm(list(zip(args.points, args.configs)), desc="sweep points", file=sys.stderr):
        name = point_name(overrides)
        log.info("point %s (%s)", name, ", ".join(f"{k} {format_value(getattr(cfg, k))}" for k in args.grid_values))
        rows += run_point(cfg, name, overrides, items, args.budgets, args, trained=True)
    baseline = []
    if args.baseline:
        cfg = dataclasses.replace(base_cfg, out_dir=str(args.out_dir / BASELINE_DIR))
        log.info("baseline %s on the untrained base model", " ".join(args.baseline))
        baseline = run_point(cfg, BASELINE_DIR, {}, items, args.budgets, args, trained=False)
    at_base = base_values(args.grid_values, args.base_values)
    rows = complete_rows(rows, args.grid_values, at_base)  # baseline rows: no trainer settings ('-')
    paired = args.mode == "one_at_a_time"
    if paired:
        folders = {point_name(o): args.out_dir / "points" / point_name(o) for o in args.points}
        folders[BASELINE_DIR] = args.out_dir / BASELINE_DIR
        rows, baseline = (add_paired(r, folders, args.steps, parse_runs(args.sources)[0].label)
                          for r in (rows, baseline))
    columns = result_columns(args.grid_values, args.steps, paired)
    wall = time.perf_counter() - start
    spent = sum({r["point"]: (r.get("train_seconds") or 0) + r["eval_seconds"] for r in rows + baseline}.values())
    command = "python bench/sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    fixed = ", ".join(f"{k} {format_value(v)}" for k, v in args.base_values.items()) or "none"
    text = "\n".join([
        "### Sweep: Remask SFT settings vs held-out detection and decoding", "",
        f"Command: `{command}`", "",
        f"Mode {args.mode}; trainer {TRAINER} on {base_cfg.model_name} / {base_cfg.dataset}; fixed flags: {fixed}; "
        f"base values: {', '.join(f'{k} {format_value(v)}' for k, v in at_base.items())}. Evaluation: the first "
        f"{len(items)} problems of the {args.eval_split} split, gen_length {args.gen_length}, block_length "
        f"{args.block_length}, seed {args.seed}; accuracy = exact match of the final answer, token acc. = "
        "token-level accuracy on the answer span; UPS AUC = held-out incorrect-token detection (the trainer's)"
        + ("; p vs base = exact two-sided sign test against the base point on the same problems (the baseline: "
           "against the base point's first source)." if paired else "."), "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, torch threads "
        f"{torch.get_num_threads()}; training + evaluation time of the points {spent:.0f} s in all; wall time of this "
        f"invocation {wall:.0f} s (points done before are read back).",
        "", markdown_results(rows + baseline, columns, args.grid_values), ""])
    write_text(args.out_dir / "results.csv", csv_text(rows + baseline, columns))
    write_text(args.out_dir / "results.md", text)
    plot = plot_sweep(rows, baseline, args.grid_values, args.mode, args.steps, args.out_dir / "sweep.png")
    print(text)
    print(f"wrote {args.out_dir / 'results.md'}, {args.out_dir / 'results.csv'}, {plot}")
    return {"rows": rows, "baseline": baseline, "wall_seconds": wall}


if __name__ == "__main__":
    run_main(main)
