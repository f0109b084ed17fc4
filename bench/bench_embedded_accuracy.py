"""Embedded benchmark: held-out accuracy per confidence source and step budget (does the UPS decode better?).

    python bench/bench_embedded_accuracy.py          # embedded backbone + out/remedi/ups_head.safetensors, 200 problems
    python bench/bench_embedded_accuracy.py --n_problems 500 --batch_size 100 --out_dir out/bench_embedded_500

Table 1: random, tps_prob, ups and ups with remask=False (ups:noremask), so that better ranking and re-masking
are measured apart (add `tps_prob:noremask`, upstream LLaDA's low_confidence, with --sources); table 2: the margin
and entropy heuristics. Columns: steps = gen_length, 1/2, 1/4, 1/8 of it (--fractions). Every cell samples the same held-out problems (embedded test split, --data_seed) with the same
settings from torch.manual_seed(--seed), through eval_gsm_math.evaluate. Also reported: ups vs tps_prob paired
per budget (problems only one of them solves, exact two-sided sign test: with 200 problems a 3-point gap is
within noise unless the pairs say otherwise), and the UPS incorrect-token detection AUC on the same problems
noised as in training (remedi_patches.detection), next to the TPS-probability baseline.
Writes --out_dir/results.md (tables, the exact command, seed, machine), results.json and predictions.jsonl
(sources labelled NAME@STEPS; re-grade with `python eval_gsm_math.py --predictions ...`).
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from eval_gsm_math import evaluate, make_items, parse_runs, write_jsonl, write_text
from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.detection import detection_settings, ups_detection_report
from remedi_patches.embedded.task import make_split
from remedi_patches.model_args import add_model_args, model_spec_from_args
from remedi_patches.modeling_wrappers import load_ups_head
from remedi_patches.run_lock import RunLock
from remedi_patches.sampling import add_sampler_args, settings_from_args

MAIN_SOURCES = ["random", "tps_prob", "ups", "ups:noremask"]
HEURISTICS = ["margin", "entropy"]
DEFAULT_HEAD = "out/remedi/ups_head.safetensors"  # where SMDM/pretrain/train_remedi.py saves with its defaults


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


def accuracy_table(results: dict, labels: list[str], steps: list[int], gen_length: int, title: str) -> str:
    head = " | ".join(f"{s} steps ({gen_length // s} tok/step)" for s in steps)
    lines = [f"| {title} | {head} |", "|---|" + "---:|" * len(steps)]
    for label in labels:
        cells = " | ".join(f"{results[label][s]['accuracy']:.3f}" for s in steps)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def paired(rows: list[dict], a: str, b: str, steps: list[int]) -> list[dict]:
    """Per budget: problems solved by a only, b only, both, neither, and the sign-test p of a vs b."""
    out = []
    for s in steps:
        right = {label: {r["index"]: r["correct"] for r in rows if r["source"] == f"{label}@{s}"} for label in (a, b)}
        pairs = [(right[a][i], right[b][i]) for i in right[a]]
        only_a = sum(x and not y for x, y in pairs)
        only_b = sum(y and not x for x, y in pairs)
        out.append({"steps": s, f"{a}_only": only_a, f"{b}_only": only_b, "both": sum(x and y for x, y in pairs),
                    "neither": sum(not x and not y for x, y in pairs), "p": sign_test(only_a, only_b)})
    return out


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, defaults={"ups_head_path": DEFAULT_HEAD})
    p.add_argument("--n_problems", type=int, default=200, help="held-out embedded problems per cell")
    p.add_argument("--split", choices=["test", "val"], default="test", help="held-out embedded split")
    p.add_argument("--data_seed", type=int, default=0, help="seed of remedi_patches.embedded.task.make_split")
    add_sampler_args(p, defaults={"gen_length": 32, "block_length": 32},
                     exclude=("steps", "confidence_source", "remask"))  # steps: --fractions; sources: --sources
    p.add_argument("--fractions", type=int, nargs="+", default=[1, 2, 4, 8], help="steps = gen_length / f")
    p.add_argument("--sources", nargs="+", default=MAIN_SOURCES, help="table 1 rows")
    p.add_argument("--heuristics", nargs="*", default=HEURISTICS, help="table 2 rows")
    p.add_argument("--eos_gating", action="store_true", help="logits_eos_inf + confidence_eos_eot_inf")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before every cell")
    p.add_argument("--batch_size", type=int, default=50, help="problems per sampler call (left-padded)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; one keeps the tiny model fast on a shared "
                   "CPU (two threads ran 5x slower on a loaded 2-core box); 0 = torch's default")
    p.add_argument("--no_detection", action="store_true", help="skip the UPS detection AUC")
    p.add_argument("--out_dir", default="out/bench_embedded", help="results.md, results.json, predictions.jsonl")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    return p


def _head_summary(path: Optional[str]) -> tuple[str, dict]:
    if path is None:
        return "none", {}
    _, meta = load_ups_head(path)
    train = meta.get("train_args") or {}
    keys = ("train_mode", "max_steps", "epochs", "batch_size", "lr", "seq_len", "r_incorrect", "lambda_ups")
    shown = ", ".join(f"{k} {train[k]}" for k in keys if k in train)
    return f"{path} (width {meta.get('width')}{', ' + shown if shown else ''})", meta


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.ups_head_path and not Path(args.ups_head_path).exists():
        raise FileNotFoundError(f"no UPS head at {args.ups_head_path}; train one with `python SMDM/pretrain/"
                                "train_remedi.py` (saves out/remedi/ups_head.safetensors) or pass --ups_head PATH")
    if args.n_problems < 1 or args.batch_size < 1:
        raise ValueError(f"--n_problems and --batch_size must be >= 1, got {args.n_problems}, {args.batch_size}")
    steps = step_budgets(args.gen_length, args.fractions)
    base = settings_from_args(args, steps=steps[0])
    budgets = [base.replace(steps=s) for s in steps]  # every budget checked before the model is loaded
    main_runs, extra_runs = parse_runs(args.sources), parse_runs(args.heuristics) if args.heuristics else []
    runs = main_runs + extra_runs
    spec = model_spec_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = make_split(args.n_problems, args.data_seed, args.split)
    records = [{"question": p.question, "answer": p.solution} for p in problems]
    items = make_items(records, "gsm8k")
    em = spec.load()
    head_text, meta = _head_summary(args.ups_head_path)

    t0 = time.perf_counter()
    rows, results = [], {r.label: {} for r in runs}
    for s, settings in zip(steps, budgets):
        cell_rows, summary = evaluate(em, items, runs, settings, fmt="gsm8k", batch_size=args.batch_size,
                                      seed=args.seed, progress=not args.no_progress)
        for r in summary["results"]:
            results[r["source"]][s] = r
        rows += [{**r, "source": f"{r['source']}@{s}"} for r in cell_rows]
    wall = time.perf_counter() - t0

    labels = [r.label for r in main_runs]
    pairs = paired(rows, "ups", "tps_prob", steps) if {"ups", "tps_prob"} <= set(labels) else []
    detection = None
    if not args.no_detection and em.ups_head is not None:
        report = ups_detection_report(em, em.ups_head, records, **detection_settings(meta),
                                      seed=args.seed)
        detection = report.to_dict()

    command = "python bench/bench_embedded_accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = ["### Embedded benchmark: held-out accuracy by confidence source and step budget", "",
             f"Command: `{command.strip()}`", "",
             f"Seed {args.seed} (torch.manual_seed before every cell); {args.n_problems} problems of the embedded "
             f"{args.split} split (make_split seed {args.data_seed}); gen_length {args.gen_length}, block_length "
             f"{args.block_length}, temperature {args.temperature}, eos gating {'on' if args.eos_gating else 'off'}, "
             f"batch {args.batch_size}. Backbone: {args.model_name or 'embedded'}. UPS head: {head_text}.", "",
             f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}, torch threads {torch.get_num_threads()}, device "
             f"{args.device}; wall time {wall:.0f} s for {len(runs) * len(steps)} cells.", "",
             accuracy_table(results, labels, steps, args.gen_length, "source")]
    if extra_runs:
        lines += ["", accuracy_table(results, [r.label for r in extra_runs], steps, args.gen_length, "heuristic")]
    if pairs:
        lines += ["", "| steps | ups only | tps_prob only | both | neither | sign-test p |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['steps']} | {p['ups_only']} | {p['tps_prob_only']} | {p['both']} | {p['neither']} | "
                  f"{p['p']:.3f} |" for p in pairs]
    if detection:
        lines += ["", f"UPS incorrect-token detection on these problems noised as in training (seq_len "
                  f"{detection['settings']['seq_len']}, r_incorrect {detection['settings']['r_incorrect']}): AUC "
                  f"{detection['auc']:.3f} vs {detection['tps_auc']:.3f} for 1 - p_TPS(token); "
                  f"{detection['n_incorrect']} incorrect of {detection['n_scored']} scored tokens."]
    text = "\n".join(lines) + "\n"
    out_dir = Path(args.out_dir)
    result = {"command": command, "settings": vars(args), "wall_seconds": wall, "steps": steps,
              "results": {label: {str(s): v for s, v in by_steps.items()} for label, by_steps in results.items()},
              "paired_ups_vs_tps_prob": pairs, "detection": detection}
    with RunLock(out_dir):
        write_jsonl(out_dir / "predictions.jsonl", rows)
        write_text(out_dir / "results.json", json.dumps(result, indent=2) + "\n")
        write_text(out_dir / "results.md", text)
    print(text)
    print(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'predictions.jsonl'}")
    return result


if __name__ == "__main__":
    run_main(main)
