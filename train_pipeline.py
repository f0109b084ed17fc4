r"""The training pipeline: one YAML runs pretraining -> SFT -> Remask SFT -> RL -> evaluation, each stage one of the
project's own scripts, the checkpoints handed on.

    python train_pipeline.py --config configs/embedded.yaml --dry_run       # check it, print every command
    python train_pipeline.py --config configs/embedded.yaml                 # --stage all: every enabled stage
    python train_pipeline.py --config configs/embedded.yaml --stage sft     # one stage, on pretrain's output
    python train_pipeline.py --config configs/embedded.yaml --stage inference --prompt "What is 3 + 4?"
    python train_pipeline.py --config configs/embedded.yaml --set sft.max_steps=2 --set eval.max_samples=5

Stages and their scripts: pretrain (SMDM/pretrain/train_mdm.py), sft (SMDM/sft/train_sft.py), remask_sft
(SMDM/pretrain/train_remedi.py), rl (SMDM/rl/train_rl.py), eval (eval_gsm_math.py), inference (generate.py);
`pretraining` is accepted for pretrain (the seeds' name). The YAML layout, the checks and the hand-offs are
remedi_patches.pipeline's (see its doc): each stage section holds that script's flags without the dashes.

Before anything runs, every stage of the file is checked by its own script's parser and config (a bad key or value
is one error line naming it, e.g. `sft.learning_rat: unknown key; did you mean lr?`). Each stage then runs as
`python <script> <flags>` with its output shown and copied to <out_dir>/logs/<stage>.log; the first failing stage
stops the pipeline with one line naming it and its log. A stage that finished (its outputs exist and
<out_dir>/logs/<stage>.done holds the same command) is skipped on a re-run, unless an earlier stage ran again; a
changed or interrupted stage runs again and its trainer resumes from the newest checkpoint in its out_dir: to redo
a stage from scratch (e.g. after changing what it trains on), delete <out_dir>/<stage> or set its `resume: none`.
inference writes nothing and runs every time. --dry_run prints the commands only (copy-pastable) and writes nothing.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from remedi_patches.cli import ArgumentParser, UserError, run_main
from remedi_patches.pipeline import ALIASES, DEFAULT_OUT, STAGES, StagePlan, build_plan, load_config


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", default="config.yaml", help="the pipeline YAML (e.g. configs/embedded.yaml)")
    p.add_argument("--stage", default="all", choices=("all", *STAGES, *(a for a in ALIASES if a != "all")),
                   help="run every enabled stage in order, or this one alone (on the earlier stage's output)")
    p.add_argument("--dry_run", action="store_true", help="check the config and print the commands; run nothing")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sft.max_steps=2 (a YAML value; repeatable)")
    p.add_argument("--prompt", action="append", default=None,
                   help="--stage inference: the prompt (repeat for a batch); sets inference.prompt")
    return p


def logs_dir(config: dict) -> Path:
    return Path(config.get("out_dir", DEFAULT_OUT)) / "logs"


def describe(plan: StagePlan) -> str:
    """`# stage: takes ... from S; gives ...` (the comment line above a command)."""
    takes = ", ".join(f"--{flag} from {plan.source}" for flag in plan.handed)
    gives = ", ".join(plan.writes)
    return f"# {plan.name}" + (f": takes {takes}" if takes else "") + (f"; writes {gives}" if gives else "")


def finished(plan: StagePlan, record: Path, line: str) -> bool:
    """Its outputs exist and the record of its last successful run holds the same command."""
    return (plan.out_dir is not None and record.is_file() and record.read_text().strip() == line
            and all(Path(p).exists() for p in plan.writes))


def run_stage(plan: StagePlan, log: Path) -> None:
    """`python <script> <flags>`, its output shown and copied to `log`; UserError naming the stage if it fails."""
    line = shlex.join(plan.command(sys.executable))
    print(f"\n{describe(plan)}\n$ {line}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write(f"$ {line}\n")
        proc = subprocess.Popen(plan.command(sys.executable), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for text in proc.stdout:
            sys.stdout.write(text)
            out.write(text)
        status = proc.wait()
    if status != 0:
        raise UserError(f"stage {plan.name} failed (exit status {status}); its output is in {log}; fix it and run "
                        "the same command again (finished stages are skipped, the trainers resume)")


def main(argv: Optional[list[str]] = None) -> list[StagePlan]:
    args = build_parser().parse_args(argv)
    stage = ALIASES.get(args.stage, args.stage)
    if args.prompt is not None:
        if stage != "inference":
            raise UserError(f"--prompt goes with --stage inference (got --stage {args.stage}); or set "
                            "inference.prompt in the config")
    config = load_config(args.config, args.sets)
    if args.prompt is not None:
        config.setdefault("inference", {})["prompt"] = list(args.prompt)
    plans = build_plan(config, stage, args.config)
    if args.dry_run:
        for plan in plans:
            print(f"{describe(plan)}\n{shlex.join(plan.command('python'))}")
        return plans
    ran = False  # once a stage runs, every later one runs too (its input may have changed)
    for plan in plans:
        log, record = logs_dir(config) / f"{plan.name}.log", logs_dir(config) / f"{plan.name}.done"
        line = shlex.join(plan.command("python"))
        if not ran and finished(plan, record, line):
            print(f"\n# {plan.name}: finished earlier ({record} holds this command); skipped", flush=True)
            continue
        started = time.time()
        run_stage(plan, log)
        ran = True
        print(f"# {plan.name}: done in {time.time() - started:.0f} s", flush=True)
        if plan.out_dir is not None:
            record.write_text(line + "\n")
    print(f"\npipeline finished: {', '.join(p.name for p in plans)} (logs in {logs_dir(config)})")
    return plans


if __name__ == "__main__":
    run_main(main)
