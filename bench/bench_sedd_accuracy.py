"""Embedded SEDD benchmark: held-out accuracy of SEDD models beside the LLaDA-style (SMDM) model of similar size.

    python bench/bench_sedd_accuracy.py                      # embedded_sedd vs the embedded backbone, 200 test problems
    python bench/bench_sedd_accuracy.py --sedd out/embedded_sedd_build/pretrain/model embedded_sedd \
        --llada out/embedded_build/mdm/final embedded       # pretrained and fine-tuned models of both kinds
    python bench/bench_sedd_accuracy.py --split val --steps 32 64 128 --predictors analytic euler  # choose settings

Every cell answers the same problems (the embedded task's --split, make_split(--n_problems, --data_seed)) and is
graded by the final answer exactly as eval_gsm_math.py grades GSM8K. A SEDD samples rows of --row_length tokens as
its SFT trainer built them (the prompt at [0, n), then the answer and its EOS padding), all of a batch in one sampler
call from a generator seeded with --seed; one cell per (model, predictor, steps). A masked-diffusion model (--llada:
the embedded backbone, an SMDM / LLaDA folder) runs through eval_gsm_math.evaluate with the --llada_source ranking,
gen_length = block_length = --llada_gen_length and --llada_steps steps, from torch.manual_seed(--seed). Choose
settings on the val split: the test split is for the numbers reported.

Writes --out_dir/results.md (table, the exact command, machine), results.json and predictions.jsonl (re-grade with
`python eval_gsm_math.py --predictions`).
"""
from __future__ import annotations

import itertools
import os
import platform
import shlex
import sys
import time
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from eval_gsm_math import EvalItem, evaluate, grade, item_texts, make_items, parse_run, write_bench_results
from remedi_patches.backbones import load_backbone, load_eval_model
from remedi_patches.cli import ArgumentParser, UserError, run_main
from remedi_patches.embedded.task import make_split
from remedi_patches.sampling import SamplerSettings
from remedi_patches.sedd.sampling import PREDICTORS, check_temperature
from remedi_patches.sedd.answers import decode_ids, encode_prompt, sample_rows

ROW_LENGTH = 72  # the embedded SEDD's SFT rows (remedi_patches.sedd.embedded, StageRecipe.max_length)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sedd", nargs="*", default=["embedded_sedd"], metavar="MODEL",
                   help="SEDD models (folders, run folders, hub names or embedded_sedd)")
    p.add_argument("--llada", nargs="*", default=["embedded"], metavar="MODEL",
                   help="masked-diffusion models to compare (embedded, an SMDM or LLaDA folder); none: SEDD only")
    p.add_argument("--split", choices=("val", "test"), default="test", help="embedded task split")
    p.add_argument("--n_problems", type=int, default=200, help="problems of the split")
    p.add_argument("--data_seed", type=int, default=0, help="make_split seed (the other benchmarks' 0)")
    p.add_argument("--steps", type=int, nargs="+", default=[128], help="SEDD reverse-diffusion steps (one cell each)")
    p.add_argument("--predictors", nargs="+", choices=PREDICTORS, default=["analytic"], help="SEDD predictors")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0],
                   help="SEDD token temperatures (1 = upstream's sampler, 0 = the most likely token; the unmasking "
                        "times are drawn either way)")
    p.add_argument("--row_length", type=int, default=ROW_LENGTH, help="SEDD rows: prompt + answer + EOS padding")
    p.add_argument("--llada_source", default="low_confidence",
                   help="masked-diffusion ranking: 'upstream' LLaDA low_confidence or a confidence source")
    p.add_argument("--llada_gen_length", type=int, default=32, help="masked-diffusion answer tokens (one block)")
    p.add_argument("--llada_steps", type=int, default=32, help="masked-diffusion steps")
    p.add_argument("--llada_temperature", type=float, default=0.0, help="masked-diffusion temperature (0 = argmax)")
    p.add_argument("--batch_size", type=int, default=50, help="problems per sampler call")
    p.add_argument("--seed", type=int, default=0, help="sampler seed of every cell")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--out_dir", default="out/bench_sedd", help="results.md, results.json, predictions.jsonl")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    return p


def check_args(args) -> None:
    for key in ("n_problems", "batch_size", "row_length", "llada_gen_length", "llada_steps"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if min(args.steps) < 1:
        raise UserError(f"--steps must all be >= 1, got {args.steps}")
    for t in args.temperatures:
        check_temperature(t)
    if not args.sedd and not args.llada:
        raise UserError("nothing to benchmark: give --sedd and/or --llada models")
    if args.llada_source == "low_confidence":  # upstream LLaDA's rule, by its own name
        args.llada_source = "upstream"
    parse_run(args.llada_source)  # ValueError naming the accepted sources


def problems(args) -> list[EvalItem]:
    split = make_split(args.n_problems, args.data_seed, args.split)
    return make_items([{"question": p.question, "answer": p.solution} for p in split], "gsm8k")


def sedd_cell(model, tokenizer, items: Sequence[EvalItem], *, steps: int, predictor: str, temperature: float,
              row_length: int, batch_size: int, seed: int, label: str, progress: bool) -> list[dict]:
    """Sample and grade every item with one SEDD setting -> prediction rows in item order."""
    texts, _ = item_texts(tokenizer, items)
    prompts = [encode_prompt(tokenizer, t) for t in texts]
    stops = [t for t in (tokenizer.eos_token_id,) if t is not None]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    with tqdm(total=len(items), desc=label, disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(items), batch_size):
            batch = range(start, min(len(items), start + batch_size))
            t0 = time.perf_counter()
            out = sample_rows(model, [prompts[i] for i in batch], row_length, steps=steps, predictor=predictor,
                              temperature=temperature, generator=generator)
            seconds = (time.perf_counter() - t0) / len(batch)
            for i, x in zip(batch, out):
                output = decode_ids(tokenizer, x[len(prompts[i]):].tolist(), model.config.mask_token_id, stops)
                extracted, correct = grade("gsm8k", output, items[i].gold)
                rows.append({"index": items[i].index, "source": label, "format": "gsm8k", "prompt": texts[i],
                             "output": output, "extracted": extracted, "gold": items[i].gold, "correct": correct,
                             "seconds": seconds, "nfe": steps + 1, "tokens": row_length - len(prompts[i])})
            bar.update(len(batch))
    return rows


def cell_summary(rows: list[dict]) -> dict:
    seconds = sum(r["seconds"] for r in rows)
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "correct": sum(r["correct"] for r in rows),
            "n": len(rows), "seconds_per_problem": seconds / len(rows),
            "tokens_per_second": sum(r["tokens"] for r in rows) / max(seconds, 1e-9)}


def results_table(cells: list[dict]) -> str:
    lines = ["| model | kind | sampling | accuracy | correct | s / problem | answer tokens / s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for c in cells:
        lines.append(f"| {c['model']} | {c['kind']} | {c['sampling']} | {c['accuracy']:.3f} | {c['correct']}/{c['n']} "
                     f"| {c['seconds_per_problem']:.3f} | {c['tokens_per_second']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    items = problems(args)
    progress = not args.no_progress
    cells, rows, t0 = [], [], time.perf_counter()
    for name in args.sedd:
        bb = load_backbone(name)
        if bb.kind != "sedd":
            raise UserError(f"--sedd {name} is a {bb.kind!r} model, not a SEDD; pass it to --llada")
        model = bb.model.eval()
        for predictor, temperature, steps in itertools.product(args.predictors, args.temperatures, args.steps):
            label = f"{name}/{predictor}:T{temperature:g}@{steps}"
            cell_rows = sedd_cell(model, bb.tokenizer, items, steps=steps, predictor=predictor, temperature=temperature,
                                  row_length=args.row_length, batch_size=args.batch_size, seed=args.seed, label=label,
                                  progress=progress)
            cells.append({"model": name, "kind": "SEDD", "sampling": f"{predictor}, temperature {temperature:g}, "
                          f"{steps} steps, rows of {args.row_length}", **cell_summary(cell_rows)})
            rows += cell_rows
            print(f"{label}: accuracy {cells[-1]['accuracy']:.3f}", file=sys.stderr, flush=True)
    run = parse_run(args.llada_source)
    settings = SamplerSettings(steps=args.llada_steps, gen_length=args.llada_gen_length,
                               block_length=args.llada_gen_length, temperature=args.llada_temperature)
    for name in args.llada:
        em = load_eval_model(name, device="cpu")
        cell_rows, _ = evaluate(em, items, [run], settings, batch_size=args.batch_size, seed=args.seed,
                                progress=progress)
        for r in cell_rows:
            r["source"] = f"{name}/{run.label}:T{args.llada_temperature:g}@{args.llada_steps}"
        cells.append({"model": name, "kind": "masked diffusion", "sampling": f"{run.label}, temperature "
                      f"{args.llada_temperature:g}, {args.llada_steps} steps, gen_length {args.llada_gen_length}",
                      **cell_summary(cell_rows)})
        rows += cell_rows
        print(f"{cell_rows[0]['source']}: accuracy {cells[-1]['accuracy']:.3f}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0

    command = "python bench/bench_sedd_accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        "### Embedded SEDD: held-out accuracy beside the masked-diffusion model", "",
        f"Command: `{command.strip()}`", "",
        f"{args.n_problems} problems of the embedded {args.split} split (make_split seed {args.data_seed}), exact "
        f"final answer; sampler seed {args.seed}, batch {args.batch_size}.", "",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}; wall time {wall:.0f} s.", "",
        results_table(cells)]) + "\n"
    result = {"command": command, "settings": vars(args), "wall_seconds": wall, "cells": cells}
    return write_bench_results(args.out_dir, rows, result, text)


if __name__ == "__main__":
    run_main(main)
