"""The main job on the embedded default (`make demo`): Remask SFT of a UPS head, decoding, and the embedded RemeDi.

    python demo.py                      # ~10 minutes on 2 CPU cores
    python demo.py --train_steps 50 --n_eval 40 --steps 32    # a quick look

1. Remask SFT (SMDM/pretrain/train_remedi.py, mode ups_only) trains a UPS head on the frozen
   embedded backbone; the held-out incorrect-token detection AUC is measured on noised data.
2. The same held-out problems are decoded with `random`, `tps_prob` and `ups` confidence under
   identical sampler settings, at each step budget of --steps, and graded like GSM8K.
3. Beside it, the shipped embedded RemeDi (the paper's dual-stream model, trained by the paper's Remask SFT
   recipe: `python -m remedi_patches.embedded.remedi`) decodes the same problems by blocks with `tps_prob`,
   `ups` and `ups:noremask` (its UPS ranking without re-masking).

Everything lands in --out_dir: the head, metrics.csv of the training run, predictions.jsonl and
steps<N>_summary.json / .md (remedi_steps<N>_... for the RemeDi) per step budget and report.json. Re-running
resumes training from its checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from eval_gsm_math import evaluate, make_items, markdown_table, parse_runs, write_jsonl, write_summary, write_text
from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.data import load_records
from remedi_patches.model_args import ModelSpec
from remedi_patches.remask_sft import RemaskConfig, run
from remedi_patches.run_lock import RunLock
from remedi_patches.sampling import SamplerSettings


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", type=Path, default=Path("out/demo"), help="head, logs, predictions, summary")
    p.add_argument("--train_steps", type=int, default=400, help="Remask SFT optimizer steps")
    p.add_argument("--batch_size", type=int, default=32, help="Remask SFT sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="UPS head learning rate")
    p.add_argument("--ups_width", type=int, default=128, help="UPS head hidden width (0: a single linear layer)")
    p.add_argument("--n_eval", type=int, default=200, help="held-out embedded problems decoded per source")
    p.add_argument("--steps", type=int, nargs="+", default=[32, 8],
                   help="step budgets to compare (gen_length / steps tokens are committed per step)")
    p.add_argument("--gen_length", type=int, default=32, help="answer tokens per problem")
    p.add_argument("--block_length", type=int, default=32, help="semi-autoregressive block size")
    p.add_argument("--infer_bs", type=int, default=50, help="problems per sampler batch")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    return p


def parse_args(argv=None):
    """Parsed flags, every one checked (ValueError naming the flag) before anything is trained or loaded."""
    args = build_parser().parse_args(argv)
    for flag in ("train_steps", "batch_size", "n_eval", "infer_bs"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.lr <= 0 or args.ups_width < 0:
        raise ValueError(f"--lr must be > 0 and --ups_width >= 0, got {args.lr} and {args.ups_width}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise NotADirectoryError(f"--out_dir {args.out_dir} is a file; pass a folder")
    args.budgets = {s: SamplerSettings(steps=s, gen_length=args.gen_length, block_length=args.block_length)
                    for s in args.steps}  # ValueError for a budget that does not fit gen_length / block_length
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out_dir
    with RunLock(out):
        return demo(args, out)


def demo(args, out: Path) -> dict:
    head_path = out / "ups_head.safetensors"
    cfg = RemaskConfig(dataset="embedded", seq_len=72, batch_size=args.batch_size, max_steps=args.train_steps,
                          lr=args.lr, warmup_steps=20, ups_width=args.ups_width, train_mode="ups_only",
                          save_path=str(head_path), out_dir=str(out / "train"), eval_every=100, eval_samples=256,
                          save_every=100, seed=args.seed, accelerator="cpu")
    print(f"[1/3] Remask SFT of a UPS head on the embedded backbone ({args.train_steps} steps)", flush=True)
    train_metrics = run(cfg)

    items = make_items(load_records("embedded", "test", limit=args.n_eval), "gsm8k")
    print(f"[2/3] decoding {args.n_eval} held-out problems with random / tps_prob / ups", flush=True)
    head_model = ModelSpec(ups_head_path=str(head_path), device="cpu").check().load()
    tables, rows, summaries = decode(args, out, head_model, items, ["random", "tps_prob", "ups"], "")
    print("[3/3] the embedded RemeDi (dual stream, the paper's Remask SFT) on the same problems", flush=True)
    remedi = ModelSpec(model_name="embedded_remedi", device="cpu").check().load()
    remedi_tables, remedi_rows, remedi_summaries = decode(args, out, remedi, items, ["tps_prob", "ups", "ups:noremask"],
                                                          "remedi_")
    write_jsonl(out / "predictions.jsonl", rows + remedi_rows)
    auc = train_metrics.get("eval_auc")
    report = {"train": {k: v for k, v in train_metrics.items() if k != "losses"},
              "decoding": {str(k): v for k, v in summaries.items()},
              "remedi": {str(k): v for k, v in remedi_summaries.items()}}
    write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")

    print("\nAccuracy on held-out embedded problems (exact final answer), the backbone with the head trained "
          "above:\n")
    print("\n\n".join(tables))
    print("\nThe embedded RemeDi (shipped: remedi_patches/embedded/assets/remedi), decoded by blocks:\n")
    print("\n\n".join(remedi_tables))
    if auc is not None:
        print(f"\nIncorrect-token detection AUC on held-out noised data: UPS {auc:.3f}, the backbone's own "
              f"1 - p_TPS {train_metrics['eval_tps_auc']:.3f} (same tokens)")
    print(f"\nhead: {head_path}\nlogs: {out / 'train'}\npredictions: {out / 'predictions.jsonl'}")
    return report


def decode(args, out: Path, em, items, sources: list[str], prefix: str) -> tuple[list[str], list[dict], dict]:
    """Every source at every step budget of --steps on `em` -> (markdown tables, prediction rows, summaries)."""
    runs = parse_runs(sources)
    tables, all_rows, summaries = [], [], {}
    for steps, settings in args.budgets.items():
        rows, summary = evaluate(em, items, runs, settings, batch_size=args.infer_bs, seed=args.seed)
        for row in rows:
            row.update(steps=steps, model=prefix.rstrip("_") or "backbone+head")
        all_rows += rows
        summaries[steps] = summary
        tables.append(f"steps={steps} (gen_length={args.gen_length}, block_length={args.block_length}, "
                      f"{args.gen_length // steps} tokens per step)\n\n{markdown_table(summary)}")
        write_summary(out, summary, prefix=f"{prefix}steps{steps}_")
    return tables, all_rows, summaries


if __name__ == "__main__":
    run_main(main)
