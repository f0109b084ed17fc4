"""Fast decoding side by side: tokens/s, NFE and accuracy of parallel unmasking and Fast-dLLM's KV caches.

    python bench/bench_fast_decoding.py                              # the embedded model and a random 20M LLaDA
    python bench/bench_fast_decoding.py --models embedded --batch 1  # one problem per sampler call
    python bench/bench_fast_decoding.py --device cuda --dtype bfloat16 --models llada20m

Cases, all LLaDA-style decoding of the same prompts with steps = gen_length (one token per step unless a parallel
rule commits more), ranked by upstream's low_confidence rule (or --confidence_source for ours):
    upstream        upstream LLaDA's sampler loop (bench/upstream_llada.reference_generate: whole-sequence softmax,
                    per-row top-k), the baseline of every ratio
    ours            sampling.generate without acceleration (same tokens as upstream: checked when the ranking is)
    +threshold T    --threshold T (default 0.9, Fast-dLLM's, and 0.99): every masked position of the block at
                    least that confident
    +prefix         cache 'prefix': per block one whole-sequence forward, then the block + suffix over cached prefix
    +dual           cache 'dual': the same refresh, then the block alone over the cached prefix and suffix
    +threshold T+prefix, +threshold T+dual   both accelerations (Fast-dLLM's "parallel + cache")

Models:
    embedded   the shipped embedded backbone (remedi_patches.embedded, 1.7M parameters); --n_problems held-out test
               problems (--split), in batches of --batch by prompt length; accuracy = exact final answer
               (eval_gsm_math.grade).
               Its window is 128 tokens and prompts run to 37, so --embedded_gen_length is 64 (128 does not fit).
    llada20m   a randomly initialised native LLaDA of about 20M parameters; --llada_batch random prompts of
               --prompt_len tokens, --gen_length 128. Random weights make every confidence ~1/V, so the threshold
               never passes and only the caches change its speed.

Timing: --repeats rounds after a warm-up round, the case order rotated every round, the median taken; a measurement
is the whole pass over the problems (embedded) or one call (llada20m). tokens/s = answer positions filled
(prompts * gen_length) / seconds; NFE = model forwards per sampler call (mean over the embedded batches).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
from bench_sampler import timer
from upstream_llada import reference_generate

from eval_gsm_math import grade, item_texts, make_items
from remedi_patches.backbones import load_eval_model
from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.embedded.task import make_split
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import SamplerSettings, decode_answers, generate, left_pad


MODELS = ("embedded", "llada20m")
UPSTREAM = "upstream"


CASES = (UPSTREAM, "ours", "+threshold", "+prefix", "+dual", "+threshold+prefix", "+threshold+dual")


def cases(kinds: list[str], thresholds: list[float]) -> dict[str, dict]:
    """Case name -> generate() arguments added to the shared settings (upstream: the reference loop), for the case
    kinds of CASES asked for; each threshold kind once per threshold ('+threshold 0.9+dual')."""
    runs = {}
    for kind in kinds:
        cache = {"cache": kind.rsplit("+", 1)[1]} if kind.endswith(("+prefix", "+dual")) else {}
        if kind.startswith("+threshold"):
            for t in thresholds:
                runs[kind.replace("+threshold", f"+threshold {t:g}")] = {"threshold": t, **cache}
        else:
            runs[kind] = cache
    return runs


class Workload:
    """Prompt batches and how to decode and score them: `decode(case, trajectory)` -> answers (list of str or
    tensors), `correct(answers)` -> problems solved or None (no accuracy for random weights)."""

    def __init__(self, model, mask_id: int, batches: list[tuple[torch.Tensor, torch.Tensor | None]],
                 settings: SamplerSettings, eos_id, eot_id, finish=None, golds=None):
        self.model, self.mask_id, self.batches, self.settings = model, mask_id, batches, settings
        self.eos_id, self.eot_id, self.finish, self.golds = eos_id, eot_id, finish, golds

    @property
    def prompts(self) -> int:
        return sum(ids.shape[0] for ids, _ in self.batches)

    def decode(self, case: str, extra: dict, trajectory: Trajectory) -> list:
        s = self.settings
        out = []
        for ids, am in self.batches:
            if case == UPSTREAM:
                x = reference_generate(self.model, ids, am, s.steps, s.gen_length, s.block_length, s.temperature,
                                       s.cfg_scale, s.remasking, self.mask_id)
                trajectory.forwards += s.steps
                trajectory.calls += 1
            else:
                x = generate(self.model, ids, am, mask_id=self.mask_id, eos_id=self.eos_id, eot_id=self.eot_id,
                             trajectory=trajectory, **{**s.generate_kwargs(), **extra})
            out.append(x[:, ids.shape[1]:])
        return out

    def correct(self, answers: list) -> int | None:
        if self.golds is None:
            return None
        texts = [t for a in answers for t in self.finish(a)]
        return sum(grade("gsm8k", text, gold)[1] for text, gold in zip(texts, self.golds))


def embedded(args, device, dtype) -> Workload:
    em = load_eval_model(None, device=device, dtype=dtype)
    problems = make_split(args.n_problems, args.data_seed, args.split)
    items = make_items([{"question": p.question, "answer": p.solution} for p in problems], "gsm8k")
    texts, applied = item_texts(em.tokenizer, items)
    encoded = [em.tokenizer(t, add_special_tokens=not applied)["input_ids"] for t in texts]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # batches of similar lengths, as the evaluator
    batches = []
    for start in range(0, len(order), args.batch):
        ids, am = left_pad([encoded[i] for i in order[start:start + args.batch]], em.pad_id)
        batches.append((ids.to(device), None if am is None else am.to(device)))
    golds = [items[i].gold for i in order]
    settings = SamplerSettings(steps=args.embedded_gen_length, gen_length=args.embedded_gen_length,
                               block_length=args.block_length, confidence_source=args.confidence_source)

    def finish(answer: torch.Tensor) -> list[str]:  # (b, G) answer ids -> texts cut at EOS / EoT
        return decode_answers(em.tokenizer, answer, 0, em.stop_ids)

    return Workload(em.model.eval(), em.mask_id, batches, settings, em.eos_id, em.eot_id, finish, golds)


def llada20m(args, device, dtype) -> Workload:
    """A random native LLaDA: 6 layers of width 384 (6 heads, MLP 1024), a 12,800-token vocabulary: 20.4M."""
    from remedi_patches.llada import LLaDAConfig, LLaDAModelLM

    vocab = 12800
    mask_id = vocab - 1
    config = LLaDAConfig(d_model=384, n_heads=6, n_kv_heads=6, n_layers=6, mlp_hidden_size=1024, vocab_size=vocab,
                         embedding_size=vocab, mask_token_id=mask_id, eos_token_id=mask_id - 1,
                         pad_token_id=mask_id - 1, max_sequence_length=args.prompt_len + args.gen_length)
    torch.manual_seed(0)
    model = LLaDAModelLM(config).to(device, dtype).eval()
    prompt = torch.randint(0, mask_id - 1, (args.llada_batch, args.prompt_len), device=device)
    settings = SamplerSettings(steps=args.gen_length, gen_length=args.gen_length, block_length=args.block_length,
                               confidence_source=args.confidence_source)
    return Workload(model, mask_id, [(prompt, None)], settings, None, None)


def bench_model(name: str, args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    work = {"embedded": embedded, "llada20m": llada20m}[name](args, args.device, dtype)
    runs = cases(args.cases, args.threshold)
    now = timer(args.device, "wall")
    times = {case: [] for case in runs}
    first = {}
    for rep in range(args.repeats + 1):
        order = list(runs)[rep % len(runs):] + list(runs)[:rep % len(runs)]  # rotate the order every round
        for case in order:
            trajectory = Trajectory(record_steps=False)
            torch.manual_seed(args.seed)
            start = now()
            answers = work.decode(case, runs[case], trajectory)
            seconds = now() - start
            if rep:  # round 0 is the warm-up
                times[case].append(seconds)
            else:
                first[case] = (answers, trajectory)
    same_as_upstream = None
    if UPSTREAM in runs and "ours" in runs:
        same_as_upstream = all(torch.equal(a, b) for a, b in zip(first[UPSTREAM][0], first["ours"][0]))
    params = sum(p.numel() for p in work.model.parameters())
    rows = []
    for case in runs:
        answers, trajectory = first[case]
        seconds = statistics.median(times[case])
        correct = work.correct(answers)
        rows.append({"model": name, "params": params, "case": case, "seconds": seconds, "nfe": trajectory.nfe,
                     "tokens_per_s": work.prompts * work.settings.gen_length / seconds,
                     "accuracy": None if correct is None else correct / work.prompts, "n": work.prompts,
                     "gen_length": work.settings.gen_length, "block_length": work.settings.block_length,
                     "batch": work.batches[0][0].shape[0], "prompt_len": work.batches[-1][0].shape[1],
                     "ours_equals_upstream": same_as_upstream})
    return rows


def print_table(rows: list[dict]) -> None:
    """One table of every model and case, with the ratios to the first case's tokens/s (upstream by default) and the
    accuracy change."""
    base = {}
    for r in rows:
        base.setdefault(r["model"], r)
    print(f"| model | case | NFE / call | median s | tokens/s | vs {rows[0]['case']} | accuracy | Δ points |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = base[r["model"]]
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        delta = "-" if r["accuracy"] is None else f"{100 * (r['accuracy'] - b['accuracy']):+.1f}"
        print(f"| {r['model']} ({r['params'] / 1e6:.1f}M; gen {r['gen_length']}, block {r['block_length']}, batch "
              f"{r['batch']}) | {r['case']} | {r['nfe']:.1f} | {r['seconds']:.3f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x | {acc} | {delta} |")
    print()
    for model, b in base.items():
        if b["ours_equals_upstream"] is not None:
            print(f"{model}: ours without acceleration decodes the same tokens as upstream: "
                  f"{'yes' if b['ours_equals_upstream'] else 'NO'}")


def main(argv=None) -> list[dict]:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                   help="the cases run, in this order; ratios are to the first")
    p.add_argument("--threshold", type=float, nargs="+", default=[0.9, 0.99],
                   help="the parallel rule of the +threshold cases, each case once per value: Fast-dLLM's 0.9, and "
                   "0.99, chosen for the embedded model on its val split (BENCHMARKS.md section 7)")
    p.add_argument("--confidence_source", default=None,
                   help="ranking of ours (None = upstream's low_confidence, comparable token for token)")
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--n_problems", type=int, default=200, help="embedded: held-out test problems")
    p.add_argument("--data_seed", type=int, default=0, help="embedded: seed of embedded.task.make_split")
    p.add_argument("--split", choices=["val", "test"], default="test",
                   help="embedded: the problems (choose settings such as --threshold on val, report on test)")
    p.add_argument("--batch", type=int, default=8, help="embedded: problems per sampler call")
    p.add_argument("--embedded_gen_length", type=int, default=64,
                   help="embedded: answer length (its window of 128 holds prompts of up to 37 tokens + 64)")
    p.add_argument("--gen_length", type=int, default=128, help="llada20m: answer length")
    p.add_argument("--prompt_len", type=int, default=256, help="llada20m: prompt tokens")
    p.add_argument("--llada_batch", type=int, default=1, help="llada20m: prompts per call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (None = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    for flag in ("batch", "n_problems", "repeats", "llada_batch", "prompt_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [row for name in args.models for row in bench_model(name, args)]
    print(f"command: python bench/bench_fast_decoding.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    gpu = f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}{gpu}, {args.dtype}")
    print(f"settings: steps = gen_length, temperature 0, ranking {args.confidence_source or 'low_confidence'}, "
          f"threshold {' '.join(f'{t:g}' for t in args.threshold)}; median of {args.repeats} rounds after a warm-up\n")
    print_table(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    run_main(main)
