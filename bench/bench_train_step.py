"""Training-step time and peak memory: Remask SFT `ups_only` vs a full-SFT step on the same model.

    python bench/bench_train_step.py                       # CPU, SMDM TransEncoder Diff_LLaMA_6M, vocab 2048
    python bench/bench_train_step.py --device cuda --model Diff_LLaMA_113M --vocab_size 32000 --seq_len 1024

ups_only: the trainer's update (remedi_patches.remask_sft, kind 'ups'): backbone frozen and run under
no_grad, UPS head on the detached last hidden state, TPS + UPS loss backward, AdamW on the head.
full SFT: the same forward and losses with the backbone trainable and the head on the attached hidden state,
so the backward runs through the whole backbone, AdamW on backbone + head.

Timing: both steps on one model, interleaved (A B A B ...) after warmup, median of --repeats each.
Memory: per mode, in a fresh process (so one mode's high-water mark cannot hide the other's): the state held
between steps (weights, optimizer state, batch) and the peak extra memory of one step over it (activations,
gradients). CUDA: torch.cuda.memory_allocated / max_memory_allocated. CPU: resident set size sampled every 1 ms,
with glibc told to mmap every block >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS.
Prints a markdown table with the command and the machine.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import threading
import time

import torch

from lit_gpt.config import Config
from lit_gpt.model import TransEncoder
from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.losses import remask_losses
from remedi_patches.modeling_wrappers import backbone_forward
from remedi_patches.noise import apply_remask_noise
from remedi_patches.ups_head import UPSHead
from remedi_patches.block_layout import plain_rows
from remedi_patches.remask_sft import remask_forward

MODES = ("ups_only", "full_sft")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Diff_LLaMA_6M", help="lit_gpt config name of the TransEncoder backbone")
    p.add_argument("--vocab_size", type=int, default=2048, help="vocabulary of the backbone")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=64, help="clean prompt tokens per row (the rest is answer)")
    p.add_argument("--ups_width", type=int, default=0, help="UPS head width (0: one Linear)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="backbone weights dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: elapsed time; cpu: CPU time of this process (steadier on a shared machine, "
                        "equal to wall time with --threads 1 on an idle core; CPU device only)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args):
    """Backbone, UPS head, both optimizers and one noised batch, all on args.device."""
    torch.manual_seed(args.seed)
    config = Config.from_name(args.model, vocab_size=args.vocab_size, block_size=max(args.seq_len, 128))
    dtype = getattr(torch, args.dtype)
    model = TransEncoder(config).to(args.device, dtype)
    head = UPSHead(config.n_embd, args.ups_width).to(args.device)
    opt_head = torch.optim.AdamW(head.parameters(), lr=1e-4)
    opt_full = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, args.prompt_len:] = True
    noise = apply_remask_noise(ids, answer, config.mask_id, 0.1, config.vocab_size, [], generator=g)
    to = lambda x: x.to(args.device)  # noqa: E731
    batch = (to(ids), to(answer), to(answer.sum(1)), type(noise)(*(to(x) for x in noise)))
    return model, head, opt_head, opt_full, batch


def ups_only_step(model, head, opt_head, batch) -> None:
    ids, answer, answer_len, noise = batch
    model.requires_grad_(False)
    losses, _ = remask_forward(model, head, noise, plain_rows(ids, answer), "ups", 1.0)
    losses.total.backward()
    opt_head.step()
    opt_head.zero_grad(set_to_none=True)


def full_sft_step(model, head, opt_full, batch) -> None:
    ids, answer, answer_len, noise = batch
    model.requires_grad_(True)
    logits, hidden = backbone_forward(model, noise.noisy, None, need_hidden=True)
    losses = remask_losses(logits, head(hidden), ids, noise.noisy, noise.masked, noise.incorrect, noise.p_mask,
                           answer, answer_len, 1.0)
    losses.total.backward()
    opt_full.step()
    opt_full.zero_grad(set_to_none=True)


def run_step(mode, model, head, opt_head, opt_full, batch) -> None:
    if mode == "ups_only":
        ups_only_step(model, head, opt_head, batch)
    else:
        full_sft_step(model, head, opt_full, batch)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(args) -> dict[str, list[float]]:
    """Seconds per step of each mode, interleaved."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, head, opt_head, opt_full, batch = build(args)
    for _ in range(args.warmup):
        for mode in MODES:
            run_step(mode, model, head, opt_head, opt_full, batch)
    times = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            _sync(args.device)
            t0 = clock()
            run_step(mode, model, head, opt_head, opt_full, batch)
            _sync(args.device)
            times[mode].append(clock() - t0)
    return times


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_memory(args, mode: str) -> tuple[int, int]:
    """(bytes held between steps, peak extra bytes of one step) for `mode`; run in a fresh process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    start = torch.cuda.memory_allocated() if args.device == "cuda" else _rss()
    model, head, opt_head, opt_full, batch = build(args)
    for _ in range(max(args.warmup, 1)):  # optimizer state exists before the measured step
        run_step(mode, model, head, opt_head, opt_full, batch)
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_step(mode, model, head, opt_head, opt_full, batch)
        torch.cuda.synchronize()
        return base - start, torch.cuda.max_memory_allocated() - base
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run_step(mode, model, head, opt_head, opt_full, batch)
    done.set()
    sampler.join()
    return base - start, max(peak[0], _rss()) - base


def _memory_child(args, mode, queue) -> None:
    queue.put(step_memory(args, mode))


def measure_memory(args) -> dict[str, tuple[int, int]]:
    ctx = mp.get_context("spawn")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # read by the children's glibc at start
    out = {}
    for mode in MODES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(args, mode, queue))
        proc.start()
        out[mode] = queue.get()
        proc.join()
    return out


def machine(args) -> str:
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    load = ", load average %.1f / %.1f / %.1f" % os.getloadavg()
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{load}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    if args.device == "cuda" and args.clock == "cpu":
        raise ValueError("--clock cpu measures host CPU time, not GPU work; use --clock wall with --device cuda")

    with torch.device("meta"):
        n_params = sum(p.numel() for p in TransEncoder(Config.from_name(args.model, vocab_size=args.vocab_size))
                       .parameters())
    times = time_steps(args)
    memory = measure_memory(args)
    med = {m: statistics.median(times[m]) for m in MODES}
    ratio = med["ups_only"] / med["full_sft"]
    mem = "CUDA allocated" if args.device == "cuda" else "RSS"
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        f"Backbone {args.model} (vocab {args.vocab_size}, {n_params / 1e6:.2f}M parameters, {args.dtype}), "
        f"batch {args.batch_size} x {args.seq_len} tokens, UPS width {args.ups_width}; "
        f"{args.repeats} interleaved repeats after {args.warmup} warmup, median of {args.clock} time.",
        "",
        f"| step | median ms | min ms | max ms | state held, MiB {mem} | step peak over it, MiB {mem} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in MODES:
        lines.append(f"| {m} | {1e3 * med[m]:.1f} | {1e3 * min(times[m]):.1f} | {1e3 * max(times[m]):.1f} "
                     f"| {mib(memory[m][0])} | {mib(memory[m][1])} |")
    peak_ratio = memory["ups_only"][1] / max(memory["full_sft"][1], 1)
    lines += ["", f"ups_only / full_sft: step time **{ratio:.3f}**, step peak memory **{peak_ratio:.3f}**", "",
              f"Command: `{shlex.join(['python', 'bench/bench_train_step.py', *sys.argv[1:]])}`",
              f"Machine: {machine(args)}"]
    print("\n".join(lines))
    return {"median_s": med, "ratio": ratio, "memory_bytes": memory}


if __name__ == "__main__":
    run_main(main)
