"""Speed of block-diffusion decoding: the KV cache vs recomputing the context, and vs LLaDA-style decoding.

    python bench/bench_block_decoding.py                       # tiny dual-stream LLaDA and the embedded RemeDi
    python bench/bench_block_decoding.py --models remedi_llada --n_layer 8 --n_embd 512 --repeats 5
    python bench/bench_block_decoding.py --device cuda --dtype bfloat16 --n_layer 32 --n_embd 4096 ...

Models (random weights: the speed does not depend on them; both have their own UPS stream):
    remedi_llada   RemeDiUPMModelLM, --n_layer main layers of width --n_embd, --ups_blocks UPS blocks placed by
                   the default rule (llada.default_ups_positions: [0, 2] of 4 layers; [0, 10, 20, 30] of 32 for 4),
                   vocabulary --vocab, random prompts of --prompt_len tokens
    embedded       the embedded backbone made dual-stream (lit_gpt.dual_stream.remedi_from_backbone: UPS blocks
                   after layers [0, 2, 4] of 6), prompts from the embedded task's test problems; its window of 128
                   tokens caps prompt + answer, so --gen_length is lowered to fit when needed

Runs per model, interleaved round-robin, median over --repeats after one warm-up each; every run decodes the same
batch with the same settings (ranking by the model's UPS, confidence_source 'ups'; EOS stop off, so every block is
decoded and all runs do the same work):
    block+cache    block_decoding.block_generate(kv_cache=True): prompt once into the KV cache, one forward of the
                   block per step, one forward to append each finished block
    block          block_generate(kv_cache=False): prompt + finished blocks + block recomputed every step
                   (block-causal mask); the same tokens as block+cache
    llada          sampling.generate(): LLaDA-style, the whole sequence every step (different tokens: another regime)
NFE = model forwards per call (Trajectory.forwards); tokens/s = batch * gen_length / median seconds.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys

import torch
from bench_sampler import timer

from remedi_patches.block_decoding import block_generate
from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import add_sampler_args, generate, settings_from_args

MODELS = ("remedi_llada", "embedded")
BENCH_DEFAULTS = {"steps": 64, "gen_length": 64, "block_length": 16}
EMBEDDED_WINDOW = 128


def remedi_llada(args) -> tuple[torch.nn.Module, int, torch.Tensor]:
    """A random tiny dual-stream LLaDA and a random prompt batch -> (model, mask_id, prompt (B, Lp))."""
    from remedi_patches.llada import RemeDiConfig, RemeDiUPMModelLM, default_ups_positions

    mask_id = args.vocab - 1
    config = RemeDiConfig(d_model=args.n_embd, n_heads=args.n_head, n_kv_heads=args.n_head, n_layers=args.n_layer,
                          mlp_hidden_size=4 * args.n_embd, vocab_size=args.vocab, embedding_size=args.vocab,
                          mask_token_id=mask_id, eos_token_id=mask_id - 1, pad_token_id=mask_id - 1,
                          max_sequence_length=args.prompt_len + args.gen_length,
                          ups_positions=default_ups_positions(args.n_layer, args.ups_blocks))
    prompt = torch.randint(0, mask_id, (args.batch, args.prompt_len))
    return RemeDiUPMModelLM(config), mask_id, prompt


def embedded(args) -> tuple[torch.nn.Module, int, torch.Tensor]:
    """The embedded backbone made dual-stream, and the first `batch` embedded test prompts (cropped to fit)."""
    from lit_gpt.dual_stream import remedi_from_backbone
    from remedi_patches.backbones import load_backbone
    from remedi_patches.embedded.task import format_prompt, make_split
    from remedi_patches.sampling import left_pad

    backbone = load_backbone(None)
    room = EMBEDDED_WINDOW - args.gen_length
    prompts = [backbone.tokenizer(format_prompt(p.question))["input_ids"][-room:]
               for p in make_split(args.batch, 0, "test")]
    ids, _ = left_pad(prompts, backbone.eos_id)  # lengths differ: the batch is left-padded
    ids = ids[:, -min(len(p) for p in prompts):]  # one common length, so every run sees the same unpadded batch
    return remedi_from_backbone(backbone.model), backbone.mask_id, ids


def bench_model(name: str, args, settings) -> list[dict]:
    torch.manual_seed(0)
    model, mask_id, prompt = {"remedi_llada": remedi_llada, "embedded": embedded}[name](args)
    if name == "embedded" and prompt.shape[1] + settings.gen_length > EMBEDDED_WINDOW:
        raise ValueError(f"--gen_length {settings.gen_length} leaves no room for a prompt in the embedded model's "
                         f"window of {EMBEDDED_WINDOW}; use --gen_length 64 or less")
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    prompt = prompt.to(args.device)
    kw = dict(**settings.generate_kwargs(), mask_id=mask_id, eos_id=None, eot_id=None)
    cases = {
        "block+cache": lambda tr: block_generate(model, prompt, trajectory=tr, kv_cache=True, **kw),
        "block": lambda tr: block_generate(model, prompt, trajectory=tr, kv_cache=False, **kw),
        "llada": lambda tr: generate(model, prompt, trajectory=tr, **kw),
    }
    now = timer(args.device, args.clock)
    times, nfe = {case: [] for case in cases}, {}
    for rep in range(args.repeats + 1):
        names = list(cases)
        names = names[rep % len(names):] + names[:rep % len(names)]  # rotate the order every round
        for case in names:
            trajectory = Trajectory()
            torch.manual_seed(rep)
            start = now()
            cases[case](trajectory)
            if rep:  # round 0 is the warm-up
                times[case].append(now() - start)
            nfe[case] = trajectory.forwards
    params = sum(p.numel() for p in model.parameters())
    tokens = prompt.shape[0] * settings.gen_length
    rows = []
    for case in cases:
        seconds = statistics.median(times[case])
        rows.append({"model": name, "params": params, "prompt_len": prompt.shape[1], "run": case,
                     "seconds": seconds, "tokens_per_s": tokens / seconds, "nfe": nfe[case]})
    return rows


def print_table(rows: list[dict]) -> None:
    """The side-by-side table, then per model the speed-ups of block+cache (time of the other run / its time)."""
    print("| model | run | NFE | median s | tokens/s | time / block+cache |")
    print("|---|---|---:|---:|---:|---:|")
    cached = {r["model"]: r["seconds"] for r in rows if r["run"] == "block+cache"}
    for row in rows:
        print(f"| {row['model']} ({row['params'] / 1e6:.1f}M, prompt {row['prompt_len']}) | {row['run']} | "
              f"{row['nfe']} | {row['seconds']:.4f} | {row['tokens_per_s']:.1f} | "
              f"{row['seconds'] / cached[row['model']]:.2f}x |")
    print()
    for model, seconds in cached.items():
        other = {r["run"]: r["seconds"] / seconds for r in rows if r["model"] == model}
        print(f"{model}: the KV cache decodes {other['block']:.2f}x as fast as recomputing the context, "
              f"{other['llada']:.2f}x as fast as LLaDA-style decoding of the same length")


def main(argv=None) -> list[dict]:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--n_layer", type=int, default=4, help="remedi_llada: main layers")
    p.add_argument("--n_head", type=int, default=4, help="remedi_llada: attention heads")
    p.add_argument("--n_embd", type=int, default=256, help="remedi_llada: width")
    p.add_argument("--ups_blocks", type=int, default=2, help="remedi_llada: UPS blocks (the released 9B: 4 of 32)")
    p.add_argument("--vocab", type=int, default=32000, help="remedi_llada: vocabulary (the last id is the mask)")
    p.add_argument("--prompt_len", type=int, default=64, help="remedi_llada: prompt tokens")
    p.add_argument("--batch", type=int, default=1)
    add_sampler_args(p, defaults=BENCH_DEFAULTS, exclude=("confidence_source", "remask", "cfg_scale", "decoding",
                                                           "logits_eos_inf", "confidence_eos_eot_inf", "remasking"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (None = torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (time.process_time), steadier on a shared machine; use it with "
                   "--threads 1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    settings = settings_from_args(args, confidence_source="ups")  # the ranking of every run: the model's UPS
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [row for name in args.models for row in bench_model(name, args, settings)]
    print(f"command: python bench/bench_block_decoding.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    gpu = f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}{gpu}, {args.dtype}, clock {args.clock}")
    print(f"settings: batch {args.batch}, gen {settings.gen_length}, block {settings.block_length}, steps "
          f"{settings.steps}, temperature {settings.temperature}, ups_temperature {settings.ups_temperature}, "
          f"ranking 'ups', EOS stop off; median of {args.repeats}\n")
    print_table(rows)
    return rows


if __name__ == "__main__":
    run_main(main)
