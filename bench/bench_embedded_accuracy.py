"""Embedded benchmark: held-out accuracy per confidence source and step budget (does the UPS decode better?).

    python bench/bench_embedded_accuracy.py          # embedded backbone + out/remedi/ups_head.safetensors, 200 problems
    python bench/bench_embedded_accuracy.py --n_problems 500 --batch_size 100 --out_dir out/bench_embedded_500
    python bench/bench_embedded_accuracy.py --remedi out/er_paper out/er_seq --heuristics   # dual-stream RemeDis too
    python bench/bench_embedded_accuracy.py --remedi out/er_paper --skip_baseline            # the models alone

Table 1: random, tps_prob, ups and ups with remask=False (ups:noremask), so that better ranking and re-masking
are measured apart (add `tps_prob:noremask`, upstream LLaDA's low_confidence, with --sources): first on the
backbone with the --ups_head head ("backbone + head"), then on every dual-stream RemeDi of --remedi (its own TPS
and UPS; --remedi_sources; it decodes by blocks, the backbone LLaDA-style); table 2: the margin and entropy
heuristics on the backbone. Columns: steps = gen_length, 1/2, 1/4, 1/8 of it (--fractions). Every cell samples the
same held-out problems (embedded test split, --data_seed) with the same settings from torch.manual_seed(--seed),
in the batches, order and grading of eval_gsm_math.evaluate, with a Trajectory per sampler call. Also reported:
the token-level accuracy on the answer span (eval_gsm_math's token_accuracy), per model, source and budget;
the mean number of re-mask events per problem (a committed token set back to [MASK], counted in the blocks up to
the one where the answer ends); per model, ups vs tps_prob and ups vs ups:noremask paired per budget (problems
only one of them solves, exact two-sided sign test: with 200 problems a 3-point gap is within noise unless the
pairs say otherwise); and the incorrect-token detection AUC of each UPS (the head, every model's own) on the same
problems noised as in its training (layout, block length, noise: remedi_patches.detection) and with the model's
own sampled mistakes (incorrect_source tps), next to the 1 - p_TPS baseline.
Writes --out_dir/results.md (tables, the exact command, seed, machine), results.json and predictions.jsonl
(sources labelled NAME@STEPS, a model's MODEL/NAME@STEPS; re-grade with `python eval_gsm_math.py --predictions`).
"""
from __future__ import annotations

import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from tqdm import tqdm

from eval_gsm_math import (EvalItem, Run, grade, item_texts, make_items, parse_runs, reference_ids, row_token_accuracy,
                           sample_answer_ids, summarise)
from eval_gsm_math import write_bench_results
from remedi_patches.backbones import EvalModel, embedded_folder, max_length_of
from remedi_patches.cli import ArgumentParser, UserError, run_main
from remedi_patches.detection import detection_settings, model_meta, ups_detection_report
from remedi_patches.embedded.task import make_split
from remedi_patches.model_args import ModelSpec, add_model_args, model_spec_from_args
from remedi_patches.modeling_wrappers import has_ups_stream, load_ups_head
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import PromptWindow, SamplerSettings, add_sampler_args, decode_answers, settings_from_args

MAIN_SOURCES = ["random", "tps_prob", "ups", "ups:noremask"]
REMEDI_SOURCES = ["ups", "ups:noremask", "tps_prob", "random"]
HEURISTICS = ["margin", "entropy"]
PAIRS = [("ups", "tps_prob"), ("ups", "ups:noremask")]  # paired per model and budget when both ran
DEFAULT_HEAD = "out/remedi/ups_head.safetensors"  # where SMDM/pretrain/train_remedi.py saves with its defaults
BASELINE = "backbone + head"  # the model column of the backbone's rows
TRAIN_KEYS = ("train_mode", "max_steps", "epochs", "batch_size", "lr", "seq_len", "layout", "block_length",
              "incorrect_source", "r_incorrect", "label_smoothing", "lambda_ups")


class Bench(NamedTuple):
    """One benchmarked model: its table label, the loaded bundle, the runs of table 1 and of table 2, its training
    meta and the UPS head (None: its own UPS stream, or no UPS)."""

    label: str
    em: EvalModel
    runs: list[Run]
    extra: list[Run]
    meta: dict
    head: Optional[torch.nn.Module]

    def name(self, source: str) -> str:
        """The results / predictions key of `source` on this model: source, or MODEL/source."""
        return source if self.label == BASELINE else f"{self.label}/{source}"


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test of wins vs losses (ties dropped); 1.0 when there are none."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def step_budgets(gen_length: int, fractions: list[int]) -> list[int]:
    bad = [f for f in fractions if f < 1 or gen_length % f]
    if bad:
        raise ValueError(f"--fractions {bad} do not divide gen_length={gen_length}; use divisors such as 1 2 4 8")
    return [gen_length // f for f in fractions]


def remask_events(trajectory: Trajectory, prompt_len: int, stop_ids: Sequence[int]) -> list[int]:
    """Per row of one sampler call: committed tokens set back to [MASK] (StepRecord.remasked), counted in the
    blocks that start at or before the row's first stop token (its answer's end; rows finished earlier than the
    batch are decoded on, but those blocks are dropped from the answer). The trajectory keeps tokens."""
    final = trajectory.steps[-1].tokens[:, prompt_len:]  # (B, G) the sequence after the last step
    stop = torch.isin(final, torch.tensor(list(stop_ids), dtype=final.dtype))
    end = torch.where(stop.any(-1), prompt_len + stop.int().argmax(-1), torch.full_like(final[:, 0], 2 ** 62))
    counts = sum(step.remasked.sum(-1) * (step.start <= end) for step in trajectory.steps)  # (B,)
    return [int(c) for c in counts]


def run_cell(em: EvalModel, items: Sequence[EvalItem], run: Run, settings: SamplerSettings, *, batch_size: int,
             seed: int, label: str, progress: bool = True) -> list[dict]:
    """eval_gsm_math.evaluate of one run (the same batches by prompt length, torch.manual_seed(seed), grading and
    rows, token_accuracy included) with the re-mask events of every problem (`remasks`), from a Trajectory per
    sampler call."""
    rs = run.settings(settings)
    fit = PromptWindow(max_length_of(em.model), settings.gen_length)
    texts, applied = item_texts(em.tokenizer, items)
    lengths = [len(ids) for ids in em.tokenizer(texts, add_special_tokens=not applied)["input_ids"]]
    fit.report(lengths)
    references = reference_ids(em, items)
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    torch.manual_seed(seed)
    rows = []
    with tqdm(total=len(items), desc=label, disable=not progress, file=sys.stderr) as bar:
        for batch in (order[s:s + batch_size] for s in range(0, len(order), batch_size)):
            trajectory = Trajectory(keep_tokens=True)
            start = time.perf_counter()
            answer_ids, prompt_len = sample_answer_ids(em, [texts[i] for i in batch], rs, applied, fit, trajectory)
            seconds = (time.perf_counter() - start) / len(batch)
            answers = decode_answers(em.tokenizer, answer_ids, 0, em.stop_ids)
            for i, output, answer, remasks in zip(batch, answers, answer_ids.tolist(),
                                                  remask_events(trajectory, prompt_len, em.stop_ids)):
                extracted, correct = grade("gsm8k", output, items[i].gold)
                rows.append({"index": items[i].index, "source": run.label, "format": "gsm8k", "prompt": texts[i],
                             "output": output, "extracted": extracted, "gold": items[i].gold, "correct": correct,
                             "seconds": seconds, "remasks": remasks,
                             "token_accuracy": row_token_accuracy(em, answer, references[i])})
            bar.update(len(batch))
    return sorted(rows, key=lambda r: r["index"])


def accuracy_table(results: dict, models: list[Bench], runs_of: str, steps: list[int], gen_length: int, title: str,
                   key: str = "accuracy", fmt: str = ".3f") -> str:
    """One row per model and run of its `runs_of` ('runs' or 'extra'), one column per budget: results[...][key]."""
    head = " | ".join(f"{s} steps ({gen_length // s} tok/step)" for s in steps)
    lines = [f"| model | {title} | {head} |", "|---|---|" + "---:|" * len(steps)]
    for m in models:
        for run in getattr(m, runs_of):
            cells = " | ".join(f"{results[m.name(run.label)][s][key]:{fmt}}" for s in steps)
            lines.append(f"| {m.label} | {run.label} | {cells} |")
    return "\n".join(lines)


def paired(rows: list[dict], a: str, b: str, steps: list[int]) -> list[dict]:
    """Per budget: problems solved by a only, b only, both, neither, and the sign-test p of a vs b."""
    out = []
    for s in steps:
        right = {label: {r["index"]: r["correct"] for r in rows if r["source"] == f"{label}@{s}"} for label in (a, b)}
        pairs = [(right[a][i], right[b][i]) for i in right[a]]
        only_a = sum(x and not y for x, y in pairs)
        only_b = sum(y and not x for x, y in pairs)
        out.append({"steps": s, "first_only": only_a, "second_only": only_b, "both": sum(x and y for x, y in pairs),
                    "neither": sum(not x and not y for x, y in pairs), "p": sign_test(only_a, only_b)})
    return out


def paired_table(pairs: list[dict], a: str, b: str) -> str:
    lines = [f"| model | steps | {a} only | {b} only | both | neither | sign-test p |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['model']} | {p['steps']} | {p['first_only']} | {p['second_only']} | {p['both']} | "
              f"{p['neither']} | {p['p']:.3f} |" for p in pairs]
    return "\n".join(lines)


def detection_rows(em: EvalModel, head, records: list[dict], meta: dict, model: str, seed: int) -> list[dict]:
    """The UPS detection of one model (head, or None: its own UPS stream) on `records`, noised as in its training
    and with the model's own sampled mistakes (incorrect_source tps), in its training layout."""
    trained = detection_settings(meta)["incorrect_source"]
    note = " (as trained)" if meta.get("train_args") or meta.get("hparams") else " (default)"  # no meta: defaults
    out = []
    for source in dict.fromkeys([trained, "tps"]):
        report = ups_detection_report(em, head, records, **detection_settings(meta, incorrect_source=source),
                                      seed=seed).to_dict()
        s = report["settings"]
        out.append({"model": model, "noise": source + (note if source == trained else ""),
                    "incorrect_source": source, "layout": s["layout"], "block_length": s["block_length"],
                    "seq_len": s["seq_len"], "r_incorrect": s["r_incorrect"], "auc": report["auc"],
                    "tps_auc": report["tps_auc"], "n_incorrect": report["n_incorrect"],
                    "n_scored": report["n_scored"]})
    return out


def detection_table(rows: list[dict]) -> str:
    show = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731  (one class only: no AUC)
    lines = ["| model | layout (block) | incorrect tokens | UPS AUC | 1 - p_TPS AUC | incorrect / scored |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['layout']} ({r['block_length']}) | {r['noise']} | {show(r['auc'])} | "
              f"{show(r['tps_auc'])} | {r['n_incorrect']} / {r['n_scored']} |" for r in rows]
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, defaults={"ups_head_path": DEFAULT_HEAD})
    p.add_argument("--n_problems", type=int, default=200, help="held-out embedded problems per cell")
    p.add_argument("--split", choices=["test", "val"], default="test", help="held-out embedded split")
    p.add_argument("--data_seed", type=int, default=0, help="seed of remedi_patches.embedded.task.make_split")
    add_sampler_args(p, defaults={"gen_length": 32, "block_length": 32},
                     exclude=("steps", "confidence_source", "remask"))  # steps: --fractions; sources: --sources
    p.add_argument("--fractions", type=int, nargs="+", default=[1, 2, 4, 8], help="steps = gen_length / f")
    p.add_argument("--sources", nargs="+", default=MAIN_SOURCES, help="table 1 rows of the backbone + head")
    p.add_argument("--heuristics", nargs="*", default=HEURISTICS, help="table 2 rows (backbone)")
    p.add_argument("--remedi", nargs="+", default=[], metavar="DIR",
                   help="dual-stream RemeDi folders (remedi_patches.embedded.remedi, Remask SFT --save_model_dir), "
                        "each benchmarked with its own TPS and UPS")
    p.add_argument("--remedi_labels", nargs="+", default=None, metavar="NAME",
                   help="one table label per --remedi folder (default: the folder names)")
    p.add_argument("--remedi_sources", nargs="+", default=REMEDI_SOURCES, help="table 1 rows of every --remedi model")
    p.add_argument("--skip_baseline", action="store_true",
                   help="only the --remedi models: no backbone rows, heuristics or head detection (no --ups_head)")
    p.add_argument("--eos_gating", action="store_true", help="logits_eos_inf + confidence_eos_eot_inf")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before every cell")
    p.add_argument("--batch_size", type=int, default=50, help="problems per sampler call (left-padded)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; one keeps the tiny model fast on a shared "
                   "CPU (two threads ran 5x slower on a loaded 2-core box); 0 = torch's default")
    p.add_argument("--no_detection", action="store_true", help="skip the UPS detection AUCs")
    p.add_argument("--out_dir", default="out/bench_embedded", help="results.md, results.json, predictions.jsonl")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars (one line per cell remains)")
    return p


def _train_summary(meta: dict) -> str:
    train = meta.get("train_args") or meta.get("hparams") or {}
    return ", ".join(f"{k} {train[k]}" for k in TRAIN_KEYS if k in train)


def _head_summary(path: Optional[str]) -> tuple[str, dict]:
    if path is None:
        return "none", {}
    _, meta = load_ups_head(path)
    shown = _train_summary(meta)
    return f"{path} (width {meta.get('width')}{', ' + shown if shown else ''})", meta


def remedi_models(args) -> list[tuple[str, ModelSpec]]:
    """(label, checked ModelSpec) per --remedi folder, before anything loads."""
    labels = args.remedi_labels or [Path(d).name for d in args.remedi]
    if len(labels) != len(args.remedi):
        raise UserError(f"--remedi_labels names {len(labels)} models but --remedi gives {len(args.remedi)} folders")
    bad = [x for x in labels if not x or "/" in x or "@" in x or x == BASELINE]
    if len(set(labels)) != len(labels) or bad:
        raise UserError(f"model labels must be distinct and hold no '/' or '@': {labels}; pass --remedi_labels")
    for d in args.remedi:
        if embedded_folder(d) is None and not Path(d).is_dir():
            raise FileNotFoundError(f"--remedi {d}: no such folder; build one with `python -m "
                                    "remedi_patches.embedded.remedi --out_dir DIR` or train one with Remask SFT")
    return [(label, ModelSpec(model_name=d, device=args.device, dtype=args.dtype).check())
            for label, d in zip(labels, args.remedi)]


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.skip_baseline and not args.remedi:
        raise UserError("--skip_baseline leaves nothing to benchmark; pass --remedi DIR [DIR ...]")
    if not args.skip_baseline and args.ups_head_path and not Path(args.ups_head_path).exists():
        raise FileNotFoundError(f"no UPS head at {args.ups_head_path}; train one with `python SMDM/pretrain/"
                                "train_remedi.py` (saves out/remedi/ups_head.safetensors) or pass --ups_head PATH")
    if args.n_problems < 1 or args.batch_size < 1:
        raise ValueError(f"--n_problems and --batch_size must be >= 1, got {args.n_problems}, {args.batch_size}")
    steps = step_budgets(args.gen_length, args.fractions)
    base = settings_from_args(args, steps=steps[0])
    budgets = [base.replace(steps=s) for s in steps]  # every budget checked before the model is loaded
    main_runs = [] if args.skip_baseline else parse_runs(args.sources)
    extra_runs = parse_runs(args.heuristics) if args.heuristics and not args.skip_baseline else []
    remedi_runs = parse_runs(args.remedi_sources) if args.remedi else []
    specs = remedi_models(args)
    spec = None if args.skip_baseline else model_spec_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = make_split(args.n_problems, args.data_seed, args.split)
    records = [{"question": p.question, "answer": p.solution} for p in problems]
    items = make_items(records, "gsm8k")

    models = []
    if spec is not None:
        em = spec.load()
        head_text, meta = _head_summary(args.ups_head_path)
        models.append(Bench(BASELINE, em, main_runs, extra_runs, meta, em.ups_head))
    for label, remedi_spec in specs:
        em = remedi_spec.load()
        if not has_ups_stream(em.model):
            raise UserError(f"--remedi {remedi_spec.model_name} is no dual-stream RemeDi (no UPS stream of its own); "
                            "pass a folder written by remedi_patches.embedded.remedi or by Remask SFT")
        models.append(Bench(label, em, remedi_runs, [], model_meta(remedi_spec.model_name), None))

    t0 = time.perf_counter()
    n_cells, done = sum(len(m.runs) + len(m.extra) for m in models) * len(steps), 0
    rows, results = [], {}
    for m in models:
        for run in m.runs + m.extra:
            for s, settings in zip(steps, budgets):
                name = m.name(run.label)
                cell_rows = run_cell(m.em, items, run, settings, batch_size=args.batch_size, seed=args.seed,
                                     label=f"{name}@{s}", progress=not args.no_progress)
                cell = summarise(cell_rows)["results"][0]
                cell["remasks_per_problem"] = sum(r["remasks"] for r in cell_rows) / len(cell_rows)
                results.setdefault(name, {})[s] = {**cell, "source": name}
                rows += [{**r, "source": f"{name}@{s}"} for r in cell_rows]
                done += 1
                print(f"[{done}/{n_cells}] {m.label}: {run.label} @ {s} steps: accuracy {cell['accuracy']:.3f}, "
                      f"{cell['remasks_per_problem']:.2f} re-masks / problem ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0

    pairs = {f"{a} vs {b}": [{"model": m.label, **p} for m in models if {a, b} <= {r.label for r in m.runs}
                             for p in paired(rows, m.name(a), m.name(b), steps)] for a, b in PAIRS}
    detection = []
    if not args.no_detection:
        for m in models:
            if m.head is not None or has_ups_stream(m.em.model):
                print(f"detection: {m.label}", file=sys.stderr, flush=True)
                detection += detection_rows(m.em, m.head, records, m.meta, m.label, args.seed)

    command = "python bench/bench_embedded_accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    described = [] if spec is None else [f"Backbone: {args.model_name or 'embedded'}. UPS head: {head_text}."]
    described += [f"Model {label}: {s.model_name} ({_train_summary(model_meta(s.model_name)) or 'no training meta'})."
                  for label, s in specs]
    lines = ["### Embedded benchmark: held-out accuracy by confidence source and step budget", "",
             f"Command: `{command.strip()}`", "",
             f"Seed {args.seed} (torch.manual_seed before every cell); {args.n_problems} problems of the embedded "
             f"{args.split} split (make_split seed {args.data_seed}); gen_length {args.gen_length}, block_length "
             f"{args.block_length}, temperature {args.temperature}, eos gating {'on' if args.eos_gating else 'off'}, "
             f"batch {args.batch_size}. " + " ".join(described), "",
             f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}, torch threads {torch.get_num_threads()}, device "
             f"{args.device}; wall time {wall:.0f} s for {n_cells} cells.", "",
             accuracy_table(results, models, "runs", steps, args.gen_length, "source")]
    if extra_runs:
        lines += ["", accuracy_table(results, models, "extra", steps, args.gen_length, "heuristic")]
    lines += ["", "Token-level accuracy on the answer span (eval_gsm_math's token_accuracy: the reference solution + "
              "EOS against the answer up to its first stop, position by position):", "",
              accuracy_table(results, models, "runs", steps, args.gen_length, "source", "token_accuracy")]
    lines += ["", "Re-mask events per problem (committed tokens set back to [MASK] up to the answer's last block, "
              "mean over the problems):", "",
              accuracy_table(results, models, "runs", steps, args.gen_length, "source", "remasks_per_problem", ".2f")]
    for (a, b), key in zip(PAIRS, pairs):
        if pairs[key]:
            lines += ["", paired_table(pairs[key], a, b)]
    if detection:
        lines += ["", "Incorrect-token detection on these problems, noised as in each model's training (layout, "
                  "block, seq_len, r_incorrect) and with the model's own sampled mistakes (tps):", "",
                  detection_table(detection)]
    text = "\n".join(lines) + "\n"
    result = {"command": command, "settings": vars(args), "wall_seconds": wall, "steps": steps,
              "results": {label: {str(s): v for s, v in by_steps.items()} for label, by_steps in results.items()},
              "paired": pairs, "detection": detection}
    return write_bench_results(args.out_dir, rows, result, text)


if __name__ == "__main__":
    run_main(main)
