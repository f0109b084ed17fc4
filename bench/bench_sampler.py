"""Cost of the sampler: UPS head over TPS confidence, and sampling overhead over the bare forwards.

    python bench/bench_sampler.py                      # SMDM TransEncoder, 4 layers, width 256, vocab 32000
    python bench/bench_sampler.py --backbone llada     # native LLaDA (output_hidden_states path)
    python bench/bench_sampler.py --repeats 9 --device cuda

Timed, interleaved round-robin, median over --repeats (after one warm-up each):
    forwards   `steps` bare model(x, attention_mask) calls on the full (B, Lp + gen_length) sequence
    upstream   sample(settings confidence_source=None)         (low_confidence)
    tps_prob   sample(settings confidence_source='tps_prob')   (dynamic remasking)
    ups        sample(settings confidence_source='ups')        (dynamic remasking, the bundle's head via UPSModel)
Targets: ups / tps_prob - 1 < 5 %; tps_prob / forwards - 1 < 10 %.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch
from lit_gpt.config import Config
from lit_gpt.model import TransEncoder

from remedi_patches.backbones import EvalModel
from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.llada import LLaDAConfig, LLaDAModelLM
from remedi_patches.modeling_wrappers import hidden_size_of
from remedi_patches.sampling import add_sampler_args, sample, settings_from_args
from remedi_patches.ups_head import UPSHead

BENCH_DEFAULTS = {"steps": 16, "gen_length": 64, "block_length": 16}


def build_backbone(args) -> tuple[torch.nn.Module, int]:
    """A randomly initialised backbone of the requested size -> (model, mask_id)."""
    if args.backbone == "smdm":
        config = Config(name="bench", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                        intermediate_size=4 * args.n_embd, vocab_size=args.vocab)
        return TransEncoder(config), config.mask_id
    config = LLaDAConfig(d_model=args.n_embd, n_heads=args.n_head, n_kv_heads=args.n_head, n_layers=args.n_layer,
                         mlp_hidden_size=4 * args.n_embd, vocab_size=args.vocab, embedding_size=args.vocab,
                         mask_token_id=args.vocab - 1)
    return LLaDAModelLM(config), args.vocab - 1


def timer(device: str, clock: str):
    if clock == "cpu":
        if device != "cpu":
            raise ValueError("--clock cpu only measures CPU runs; use --clock wall with --device cuda")
        return time.process_time

    def now() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=["smdm", "llada"], default="smdm")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ups_width", type=int, default=0, help="UPS head width (0 = one Linear)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=32)
    add_sampler_args(p, defaults=BENCH_DEFAULTS, exclude=("confidence_source", "remask"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (None = torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (time.process_time), steadier on a shared machine; "
                   "use it with --threads 1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, mask_id = build_backbone(args)
    model = model.to(args.device, dtype).eval()
    head = UPSHead(hidden_size_of(model), args.ups_width).to(args.device).eval()
    prompt = torch.randint(0, mask_id, (args.batch, args.prompt_len), device=args.device)
    am = torch.ones_like(prompt)
    x = torch.cat([prompt, torch.full((args.batch, args.gen_length), mask_id, device=args.device)], dim=1)
    x_am = torch.ones_like(x)
    bundle = EvalModel(model=model, tokenizer=None, ups_head=head, mask_id=mask_id, pad_id=0, eos_id=None,
                       eot_id=None, device=torch.device(args.device))

    @torch.no_grad()  # as the sampler
    def forwards():
        for _ in range(args.steps):
            model(x, attention_mask=x_am)

    cases = {
        "forwards": forwards,
        "upstream": lambda: sample(bundle, prompt, am, settings),
        "tps_prob": lambda: sample(bundle, prompt, am, settings.replace(confidence_source="tps_prob")),
        "ups": lambda: sample(bundle, prompt, am, settings.replace(confidence_source="ups")),
    }
    now = timer(args.device, args.clock)
    times = {name: [] for name in cases}
    for rep in range(args.repeats + 1):
        names = list(cases)
        names = names[rep % len(names):] + names[:rep % len(names)]  # rotate the order every round
        for name in names:
            start = now()
            cases[name]()
            if rep:  # round 0 is the warm-up
                times[name].append(now() - start)
    med = {name: statistics.median(t) for name, t in times.items()}

    n_params = sum(p.numel() for p in model.parameters())
    print(f"command: python bench/bench_sampler.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    gpu = f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}{gpu}, clock {args.clock}")
    print(f"model: {args.backbone} {args.n_layer} layers, width {args.n_embd}, vocab {args.vocab}, "
          f"{n_params / 1e6:.1f}M params, {args.dtype}; UPS head width {args.ups_width}; batch {args.batch}, "
          f"prompt {args.prompt_len}, gen {args.gen_length}, block {args.block_length}, steps {args.steps}, "
          f"temperature {args.temperature}; median of {args.repeats}\n")
    print("| run | median s | vs bare forwards | vs tps_prob |")
    print("|---|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.4f} | {t / med['forwards'] - 1:+.1%} | {t / med['tps_prob'] - 1:+.1%} |")
    head_cost = med["ups"] / med["tps_prob"] - 1
    overhead = med["tps_prob"] / med["forwards"] - 1
    print(f"\nUPS head cost (ups / tps_prob - 1): {head_cost:+.1%} (target < 5%)")
    print(f"sampler overhead (tps_prob / forwards - 1): {overhead:+.1%} (target < 10%); "
          f"upstream mode: {med['upstream'] / med['forwards'] - 1:+.1%}")
    return med


if __name__ == "__main__":
    run_main(main)
