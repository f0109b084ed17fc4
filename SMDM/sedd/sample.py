"""Sample from a SEDD model (score-entropy discrete diffusion, Lou et al. 2024): unconditional text, or answers after
prompts (the prompt's tokens are a fixed prefix of the sequence, never changed by the sampler).

    python SMDM/sedd/sample.py --model louaaron/sedd-small --prompt "The capital of France" --gen_length 64
    python SMDM/sedd/sample.py --model runs/sedd/2024.01.01/000000 --gen_length 128 --num_samples 4   # unconditional
    python SMDM/sedd/sample.py --model /models/sedd-small --prompt "Hi" --predictor euler --steps 128 --show_steps

--model takes what remedi_patches.backbones.load_backbone recognises as a "sedd" backbone: a hub-layout folder
(config.json + weights), a training run folder (EMA weights), a hub name, or embedded (= embedded_sedd, the tiny SEDD
the project ships for the embedded task). Each prompt is sampled in its own
sampler call of shape (num_samples, prompt tokens + gen_length): the prompt sits at positions [0, n) of every row and
the answer is the gen_length positions after it, so prompts of different lengths never share padding. An answer is
decoded up to its first EOS. Without --prompt the samples are unconditional sequences of gen_length tokens.

Library use: remedi_patches.sedd.answers (sample_answers, sample_rows, encode_prompt, decode_ids).

LLaDA / SMDM / RemeDi models are masked-diffusion models: sample them with generate.py (a SEDD's forward takes noise
levels, so generate.py refuses it).
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Optional

import torch

from remedi_patches.backbones import detect_kind, embedded_folder, load_backbone
from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.model_args import resolve_device
from remedi_patches.sedd.answers import DEFAULT_PREDICTOR, DEFAULT_STEPS, decode_ids, encode_prompt, sample_answers
from remedi_patches.sedd.loading import sedd_model_name
from remedi_patches.sedd.sampling import PREDICTORS
from remedi_patches.sources import resolve_source

__all__ = ["build_parser", "main"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SHOWN_STEPS = 4  # --show_steps prints the answer at about this many steps (and the last one)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, prog="SMDM/sedd/sample.py")
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model_name", dest="model", required=True, metavar="MODEL", default=argparse.SUPPRESS,
                   help="SEDD hub-layout folder, training run folder (EMA weights) or hub name "
                        "(e.g. louaaron/sedd-small)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub name; default the model folder's tokenizer, else GPT-2's (upstream's)")
    g.add_argument("--device", default="auto", help="torch device: auto = cuda when this torch sees a GPU, else cpu")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights stay float32 (as upstream's); bfloat16 / float16 run the transformer blocks under "
                        "autocast, as upstream samples; auto = bfloat16 on CUDA, float32 otherwise")
    s = p.add_argument_group("sampling")
    s.add_argument("--prompt", action="append", default=None,
                   help="prompt text, kept fixed as the prefix of the sequence; repeat for several prompts (default: "
                        "none, unconditional samples)")
    s.add_argument("--gen_length", type=int, default=64,
                   help="answer tokens sampled after each prompt (unconditional: the sequence length); prompt + "
                        "gen_length must fit the model's window (config model.length)")
    s.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="reverse-diffusion steps (model calls, plus one for the denoiser); 128 as upstream's configs "
                        "(sampling.steps)")
    s.add_argument("--predictor", choices=PREDICTORS, default=DEFAULT_PREDICTOR,
                   help="analytic: Tweedie tau-leaping, what upstream's sampling scripts use; euler: the Euler step "
                        "of upstream's configs (sampling.predictor, its evaluation during training)")
    s.add_argument("--temperature", type=float, default=1.0,
                   help="absorbing graph: temperature of the token a position unmasks to (when it unmasks is "
                        "unchanged); 1 = upstream's sampler, 0 = the most likely token")
    s.add_argument("--no_denoise", dest="denoise", action="store_false",
                   help="skip the final denoising step (absorbing graph: [MASK] tokens may then remain; "
                        "denoise: %(default)s)")
    s.add_argument("--num_samples", type=int, default=1, help="samples per prompt (unconditional: samples)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampler's random generator")
    s.add_argument("--show_steps", action="store_true",
                   help=f"print the (first sample's) answer at about {SHOWN_STEPS} intermediate steps")
    return p


def check_args(args) -> None:
    """Flags that are wrong whatever the model (before it is loaded)."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.gen_length < 1:
        raise ValueError(f"--gen_length must be >= 1, got {args.gen_length}")
    if not 0.0 <= args.temperature < float("inf"):
        raise ValueError(f"--temperature must be a finite number >= 0 (1 = upstream's sampler), got {args.temperature}")
    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ValueError("--prompt is empty; give the prompt text, or leave --prompt out for unconditional samples")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}, but this torch has no CUDA device; pass --device cpu")


def check_sedd_source(model: str) -> str:
    """The model source to load ('embedded' names the embedded SEDD); refuses, before loading anything, a --model
    that is missing or is not a SEDD checkpoint."""
    model = sedd_model_name(model)
    try:
        source = resolve_source(embedded_folder(model) or model, "model")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--model: {err}") from None
    try:
        kind = detect_kind(source)
    except (ValueError, FileNotFoundError):
        raise ValueError(f"--model {model} is not a SEDD model (no config.json of a SEDD, nor a SEDD run folder); "
                         "pass a SEDD folder, run folder or hub name") from None
    if kind.name != "sedd":
        raise ValueError(f"--model {model} (a {kind.name!r} backbone) is not a SEDD model; use generate.py")
    return model


def main(argv: Optional[list[str]] = None) -> list[str]:
    args = build_parser().parse_args(argv)
    check_args(args)
    model_name = check_sedd_source(args.model)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    bb = load_backbone(model_name, device=device, dtype="float32", tokenizer=args.tokenizer)
    model, tokenizer = bb.model, bb.tokenizer
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    model.autocast_dtype = AUTOCAST.get(dtype)
    mask_id = model.config.mask_token_id
    stop_ids = [t for t in (bb.eos_id, bb.eot_id) if t is not None]
    prompts = args.prompt or []
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts] or [[]]
    window = model.config.length
    longest = max(len(ids) for ids in prompt_ids)
    if longest + args.gen_length > window:  # every prompt checked before any sampling
        what = f"after a prompt of {longest} tokens " if longest else ""
        raise ValueError(f"--gen_length {args.gen_length} {what}does not fit the model's window of {window} "
                         f"positions (config model.length); lower --gen_length to at most {window - longest}"
                         + (" or shorten the prompt" if longest else ""))
    every = max(1, args.steps // SHOWN_STEPS)

    def show(i: int, step: int, t: float, x: torch.Tensor) -> None:
        if (step + 1) % every == 0 or step + 1 == args.steps:
            n = len(prompt_ids[i])
            print(f"[prompt {i + 1} step {step + 1}/{args.steps} t={t:.4f}] "
                  f"{decode_ids(tokenizer, x[0, n:].tolist(), mask_id)!r}", flush=True)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    out = sample_answers(model, prompt_ids, args.gen_length, steps=args.steps, predictor=args.predictor,
                         denoise=args.denoise, num_samples=args.num_samples, generator=generator,
                         temperature=args.temperature, callback=show if args.show_steps else None)
    seconds = time.perf_counter() - start
    tokens = sum(x.shape[0] for x in out) * args.gen_length
    print(f"(predictor {args.predictor}, steps {args.steps}, temperature {args.temperature}, gen_length "
          f"{args.gen_length}, denoise "
          f"{'on' if args.denoise else 'off'}, dtype {dtype}) | {seconds:.1f} s, {tokens / max(seconds, 1e-9):.1f} "
          "tokens/s\n")
    answers = []
    for i, (ids, x) in enumerate(zip(prompt_ids, out)):
        n = len(ids)
        assert torch.equal(x[:, :n].cpu(), torch.tensor(ids, dtype=torch.long).expand(x.shape[0], n)), \
            "the sampler changed the prompt"
        for j in range(x.shape[0]):
            label = f" {j + 1}/{x.shape[0]}" if x.shape[0] > 1 else ""
            if prompts:
                answer = decode_ids(tokenizer, x[j, n:].tolist(), mask_id, stop_ids)
                print(f"### prompt\n{prompts[i]}\n### answer{label}\n{answer}\n")
            else:
                answer = decode_ids(tokenizer, x[j].tolist(), mask_id)  # EOS kept: upstream's document separator
                print(f"### sample{label}\n{answer}\n")
            answers.append(answer)
    if mask_id is not None and not args.denoise:
        left = sum(int((x == mask_id).sum()) for x in out)
        if left:
            print(f"({left} [MASK] position(s) left: --no_denoise skips the step that removes them)")
    return answers


if __name__ == "__main__":
    run_main(main)
