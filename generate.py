"""Masked-diffusion sampling for LLaDA-style models, with RemeDi dynamic remasking: upstream's `generate()` and a CLI.

    generate(model, prompt, ...)              upstream LLaDA's sampler when confidence_source is None
    generate(..., confidence_source="ups",    RemeDi: keep the top-k_i block positions by UPS confidence,
             ups_head=head)                   re-mask the others (DESIGN.md 3.2)
    python generate.py --help                 the command line
    python generate.py --model maple-research-lab/RemeDi-Instruct --confidence_source ups --gen_length 256 \
        --block_length 32 --steps 256         the paper's dual-stream RemeDi: block diffusion with a KV cache (its
                                              default; --decoding llada for LLaDA-style), ranked by its own UPS
                                              (--ups_temperature 1.2: Plackett-Luce draws as its RL sampler)
    python generate.py --model GSAI-ML/LLaDA-8B-Instruct --gen_length 256 --block_length 32 --steps 256 \\
        --threshold 0.9 --cache dual          Fast-dLLM's parallel decoding over its dual KV cache
    python generate.py --method semi_autoregressive_origin --gen_length 128 --block_length 32
                                              LLaDA's sampling methods (--method): fixed_length (one block),
                                              semi_autoregressive_padding (upstream's blocks, the default) and
                                              semi_autoregressive_origin (the answer grows a block at a time until EOS)

The answers follow one header line: the lengths, the decoding with the fast-decoding settings that are set, and the
sampler call's cost, e.g. `(steps 256, gen_length 256, block_length 32) decoding: llada, cache: dual, threshold 0.9 |
NFE 41, 812.4 tokens/s` (NFE = model forwards of the call; tokens/s = answer positions filled per second).

The sampler and its settings live in remedi_patches.sampling (generate, SamplerSettings, sample; block diffusion in
remedi_patches.block_decoding); this file keeps upstream's import path (`from generate import generate`) and the
command line.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.backbones import kind_of, max_length_of
from remedi_patches.model_args import add_model_args, model_spec_from_args
from remedi_patches.modeling_wrappers import has_ups_stream
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import (CHAT_CHOICES, CHAT_HELP, LENGTH_DEFAULTS, TEMPLATE_HELP, UPSTREAM_RULES,
                                     PromptWindow, SamplerSettings, add_sampler_args, check_sampler_args,
                                     decode_answers, decoding_of, encode_prompts, generate, sample,
                                     settings_from_args)
from remedi_patches.trajectory_views import decoding_text, trajectory_text

__all__ = ["generate", "SamplerSettings", "UPSTREAM_RULES", "build_parser", "main"]  # upstream's import path kept

DEFAULT_PROMPT = ("Mia has 14 shells. She finds 7 more. She gives away 9. She doubles them. "
                  "How many shells does Mia have now?")
CLI_DEFAULTS = LENGTH_DEFAULTS  # None = from the model's window (remedi_patches.sampling.default_lengths)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample from a masked-diffusion LM (LLaDA / SMDM), optionally with RemeDi dynamic "
                       "remasking.")
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt text; repeat for a batch (None = one built-in question: {DEFAULT_PROMPT!r})")
    p.add_argument("--chat", choices=CHAT_CHOICES, default="auto", help=CHAT_HELP)
    p.add_argument("--prompt_template", default=None, help=TEMPLATE_HELP)
    add_sampler_args(p, defaults=CLI_DEFAULTS)
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before sampling")
    p.add_argument("--show_trajectory", action="store_true",
                   help="print each step's committed (+pos:'tok') and re-masked (-pos:'tok') tokens (recording "
                        "them slows the sampler, so tokens/s is lower with it)")
    return p


def main(argv: Optional[list[str]] = None) -> list[str]:
    args = build_parser().parse_args(argv)
    check_sampler_args(args)  # every flag checked before the model is loaded (lengths left None: after)
    spec = model_spec_from_args(args)
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ValueError("--prompt is empty; give the prompt text, or leave --prompt out for the built-in question")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    em = spec.load()  # backbone, then LoRA, then UPS head (checked to fit)
    if getattr(kind_of(em.model), "name", None) == "sedd":  # its forward takes noise levels, not masked inputs
        raise ValueError(f"{spec.model_name} is a SEDD model, which this masked-diffusion sampler cannot run; use "
                         f"python SMDM/sedd/sample.py --model {spec.model_name}")
    window = max_length_of(em.model)
    settings = settings_from_args(args, window)  # lengths left None: from the model's window
    fit = PromptWindow(window, settings.gen_length)  # one-line error when gen_length alone does not fit
    prompts = args.prompt or [DEFAULT_PROMPT]
    ids, attention_mask = fit.crop_batch(*encode_prompts(em.tokenizer, prompts, args.chat, args.prompt_template))
    # always counts the cost (NFE, tokens/s); the per-step record only with --show_trajectory
    trajectory = Trajectory(keep_tokens=args.show_trajectory, record_steps=args.show_trajectory)
    if has_ups_stream(em.model) and settings.confidence_source is None:
        logging.getLogger("generate").warning(
            "%s has its own UPS stream, but no --confidence_source was given: ranking by LLaDA's %s rule; pass "
            "--confidence_source ups to rank by the UPS (the paper's decoding)", spec.model_name or "the model",
            settings.remasking)
    torch.manual_seed(args.seed)
    out = sample(em, ids, attention_mask, settings, trajectory)
    answers = decode_answers(em.tokenizer, out, ids.shape[1], em.stop_ids)
    print(f"(steps {settings.steps}, gen_length {settings.gen_length}, block_length {settings.block_length}) "
          f"{decoding_text(settings, decoding_of(em.model, settings.decoding))} | {trajectory.cost()}\n")
    for prompt, answer in zip(prompts, answers):
        print(f"### prompt\n{prompt}\n### answer\n{answer}\n")
    if args.show_trajectory:
        print(trajectory_text(trajectory, ids.shape[1], em.tokenizer, em.mask_id))
    return answers


if __name__ == "__main__":
    run_main(main)
