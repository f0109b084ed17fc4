"""Held-out accuracy before and after RL, paired, and the reward curves of the runs (BENCHMARKS.md section 6).

    python bench/bench_rl.py --run remask_grpo embedded_remedi out/rl_bench/remask_grpo \
                             --run diffu_grpo embedded out/rl_bench/diffu_grpo --out_dir out/bench_rl

Each --run LABEL START RUN_DIR names the model RL started from and the folder train_rl.py wrote (its trained model in
RUN_DIR/model, its log in RUN_DIR/logs/version_*/metrics.csv). Both models decode the same --n_problems problems of
the embedded test split with the same greedy sampler (temperature 0; the UPS ranking for a dual-stream model, else
upstream low-confidence) at every --steps budget, each cell from torch.manual_seed(--seed); the gain is paired per
problem (exact sign test on the problems one model solves and the other does not). The reward mean / accuracy of the
rollouts and the held-out (val) accuracy per update are drawn as rewards.png. Writes results.md and results.json.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from bench_embedded_accuracy import sign_test
from eval_gsm_math import Run, evaluate, make_items
from remedi_patches.cli import ArgumentParser, UserError, run_main
from remedi_patches.embedded.task import make_split
from remedi_patches.model_args import ModelSpec
from remedi_patches.modeling_wrappers import has_ups_stream
from remedi_patches.run_lock import RunLock
from remedi_patches.sampling import SamplerSettings
from remedi_patches.trajectory_views import pyplot, write_text

SMOOTH = 10  # updates in the reward curve's moving average


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", nargs=3, action="append", required=True, metavar=("LABEL", "START", "RUN_DIR"),
                   help="a method label, the model RL started from, and the --out_dir of train_rl.py")
    p.add_argument("--n_problems", type=int, default=200, help="held-out embedded test problems")
    p.add_argument("--data_seed", type=int, default=0, help="seed of remedi_patches.embedded.task.make_split")
    p.add_argument("--steps", type=int, nargs="+", default=[32, 16], help="denoising step budgets (gen_length 32)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before every cell")
    p.add_argument("--batch_size", type=int, default=100, help="problems per sampler call")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--out_dir", default="out/bench_rl", help="results.md, results.json, rewards.png")
    return p


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of every metrics.csv of a run (resumed runs write a new version folder), in update order."""
    rows: dict[int, dict] = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v != ""})
    return [rows[k] for k in sorted(rows)]


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_rewards(runs: dict[str, list[dict]], path: Path) -> None:
    """Rollout reward mean and accuracy per update, and the held-out accuracy at the evaluated updates."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs.items():
        steps = [int(r["step"]) for r in rows if "reward" in r]
        rewards = [float(r["reward"]) for r in rows if "reward" in r]
        line, = axes[0].plot(steps, rewards, lw=0.8, alpha=0.35)
        axes[0].plot(steps, moving_average(rewards, SMOOTH), color=line.get_color(), lw=2,
                     label=f"{label} (mean of the last {SMOOTH} updates)")
        held = [(int(r["step"]), float(v)) for r in rows for k, v in r.items() if k.startswith("eval_accuracy")]
        if held:
            axes[1].plot(*zip(*held), marker="o", color=line.get_color(), label=label)
    axes[0].set(xlabel="update", ylabel="rollout reward (mean)", title="Rollouts (temperature sampling)")
    axes[1].set(xlabel="update", ylabel="accuracy", title="Held-out val accuracy (greedy, full steps)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_rows(spec: ModelSpec, items, steps: list[int], seed: int, batch_size: int) -> tuple[dict, bool]:
    """{steps: [correct per problem]} of one model under the greedy sampler."""
    em = spec.load()
    dual = has_ups_stream(em.model)
    out = {}
    for s in steps:
        settings = SamplerSettings(steps=s, gen_length=32, block_length=32, confidence_source="ups" if dual else None)
        rows, _ = evaluate(em, items, [Run("ups" if dual else None, remask=dual)], settings, batch_size=batch_size,
                           seed=seed, progress=False)
        out[s] = [bool(r["correct"]) for r in rows]
    return out, dual


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    for label, start, run_dir in args.run:
        if not (Path(run_dir) / "model").is_dir():
            raise UserError(f"--run {label}: {run_dir}/model does not exist; train it with `python SMDM/rl/train_rl.py "
                            f"--out_dir {run_dir}` first")
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = make_split(args.n_problems, args.data_seed, "test")
    items = make_items([{"question": p.question, "answer": p.solution} for p in problems], "gsm8k")
    out_dir = Path(args.out_dir)
    t0 = time.perf_counter()
    results, curves, starts = {}, {}, {}
    with RunLock(out_dir):
        for label, start, run_dir in args.run:
            if start not in starts:  # runs from the same start share its figures
                starts[start] = accuracy_rows(ModelSpec(model_name=start, device="cpu").check(), items, args.steps,
                                              args.seed, args.batch_size)
            before, dual = starts[start]
            after, _ = accuracy_rows(ModelSpec(model_name=str(Path(run_dir) / "model"), device="cpu").check(), items,
                                     args.steps, args.seed, args.batch_size)
            cells = {}
            for s in args.steps:
                wins = sum(a and not b for a, b in zip(after[s], before[s]))
                losses = sum(b and not a for a, b in zip(after[s], before[s]))
                cells[s] = {"before": sum(before[s]) / len(items), "after": sum(after[s]) / len(items),
                            "wins": wins, "losses": losses, "p": sign_test(wins, losses)}
            meta = json.loads((Path(run_dir) / "model" / "remask_sft.json").read_text())
            results[label] = {"start": start, "run_dir": run_dir, "sampler": "ups" if dual else "low_confidence",
                              "updates": meta.get("updates"), "cells": cells}
            curves[label] = metrics_rows(Path(run_dir))
            print(f"{label}: " + ", ".join(f"@{s} {c['before']:.3f} -> {c['after']:.3f} (p {c['p']:.3g})"
                                           for s, c in cells.items()), file=sys.stderr, flush=True)
        wall = time.perf_counter() - t0
        plot_rewards(curves, out_dir / "rewards.png")
        command = "python bench/bench_rl.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        lines = ["### RL on the embedded task: held-out test accuracy before and after", "",
                 f"Command: `{command.strip()}`", "",
                 f"{args.n_problems} problems of the embedded test split (make_split seed {args.data_seed}), greedy "
                 f"decoding (temperature 0; UPS top-k_i for a dual-stream model, upstream low-confidence otherwise), "
                 f"gen_length 32, block 32, seed {args.seed}. Machine: {platform.platform()}, {os.cpu_count()} CPUs, "
                 f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); wall time {wall:.0f} s.", "",
                 "| method | start | sampler | updates | steps | before | after | gain | wins / losses | sign test p |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in results.items():
            for s, c in r["cells"].items():
                lines.append(f"| {label} | {r['start']} | {r['sampler']} | {r['updates']} | {s} | {c['before']:.3f} | "
                             f"{c['after']:.3f} | {100 * (c['after'] - c['before']):+.1f} | {c['wins']} / "
                             f"{c['losses']} | {c['p']:.3g} |")
        lines += ["", f"Reward curves: {out_dir / 'rewards.png'}"]
        write_text(out_dir / "results.md", "\n".join(lines) + "\n")
        write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    run_main(main)
