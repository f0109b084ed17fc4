"""The same prompts under several confidence sources, side by side, with each run's denoising trajectory.

    python infer_compare.py --ups_head out/remedi/ups_head.safetensors       # 2 held-out embedded problems
    python infer_compare.py --dataset embedded --max_samples 3 --ups_head out/remedi/ups_head.safetensors \\
        --steps 8 --html out/compare/trajectories.html --png_dir out/compare
    python infer_compare.py --model_name GSAI-ML/LLaDA-8B-Base --ups_head checkpoints/ups_head.safetensors \\
        --lora_path checkpoints/lora_math --prompt "Give a brief plan for learning calculus." \\
        --steps 128 --gen_length 128 --block_length 16 --eos_gating
    python infer_compare.py --model maple-research-lab/RemeDi-Instruct --prompt "What is 17 * 23?" \
        --confidence_sources ups tps_logit --gen_length 256 --block_length 32 --steps 256
                              # the dual-stream RemeDi (block decoding, its own UPS) vs the official ranking

Prompts come from --prompt (repeatable) or, without one, from --dataset (answers graded); both become model input
by the one prompt rule of generate.py and eval_gsm_math.py (--chat, --prompt_template; remedi_patches.sampling.
prompt_texts), so `--prompt P --confidence_sources S` answers exactly as `generate.py --prompt P --confidence_source
S` with the same flags and seed. Every source starts from torch.manual_seed(--seed) with the same settings.
Printed first: the settings with the decoding and its fast-decoding settings (--threshold, --factor, --cache,
--cache_interval when set); then per prompt each source's answer with its re-masking events by kind (same /
changed; with a reference: corrected / broken, see remedi_patches.trajectory_views.revisions) and its run's cost
(NFE = model forwards of the sampler call, tokens/s = answer positions filled per second; all prompts are one call
per source, and recording the trajectory slows it a little); then per source and step the tokens committed
(+pos:'tok') and re-masked (-pos:'tok'), with the masks left in the current block and in the whole answer.
--html writes one self-contained page with every trajectory (step x position tables); --png_dir writes per
prompt the mask-count curves of all sources and one trajectory picture per source (remedi_patches.trajectory_views).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from eval_gsm_math import (FORMATS, EvalItem, add_eval_sampler_args, grade, has_ups, item_texts, make_items,
                           question_item, runs_and_settings, sample_texts, write_text)
from remedi_patches import trajectory_views as diag
from remedi_patches.backbones import max_length_of
from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.data import load_records
from remedi_patches.model_args import add_model_args, model_spec_from_args
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import TEMPLATE_HELP, PromptWindow, decoding_of


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Same prompts, several confidence sources, side by side, with trajectories.")
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (made model input as in generate.py: --chat, --prompt_template); repeat for more")
    p.add_argument("--prompt_template", default=None, help=TEMPLATE_HELP)
    d = p.add_argument_group("data (when no --prompt is given)")
    d.add_argument("--dataset", default="embedded", help="hub name, local file or 'embedded'")
    d.add_argument("--subset", default=None, help="hub config / sub-folder")
    d.add_argument("--split", default="test", help="dataset split")
    d.add_argument("--format", choices=FORMATS, default="gsm8k", help="grader of the answers")
    d.add_argument("--max_samples", type=int, default=2, help="first N problems")
    d.add_argument("--reference", choices=["auto", "on", "off"], default="auto",
                   help="colour kept tokens by the dataset's solution, position by position (auto: for 'embedded', "
                        "whose model writes exactly that format)")
    add_eval_sampler_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--html", default=None, help="write a self-contained HTML page of all trajectories here")
    o.add_argument("--png_dir", default=None, help="write mask-count and trajectory PNGs into this folder")
    o.add_argument("--quiet_steps", action="store_true", help="print answers only, no per-step lines")
    return p


def _items(args) -> tuple[list[EvalItem], bool]:
    """(prompts to compare, whether they carry a graded / reference answer)."""
    if args.prompt:
        return [question_item(i, p, args.prompt_template) for i, p in enumerate(args.prompt)], False
    records = load_records(args.dataset, args.split, args.subset, limit=args.max_samples)
    return make_items(records, args.format, args.prompt_template), True


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.max_samples < 1:
        raise ValueError(f"--max_samples must be >= 1, got {args.max_samples}")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ValueError("--prompt is empty; give the prompt text, or leave --prompt out to use --dataset")
    runs_and_settings(args)  # every flag checked before loading
    spec = model_spec_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    items, graded = _items(args)
    em = spec.load()
    window = max_length_of(em.model)
    runs, settings = runs_and_settings(args, window, has_ups(em))  # lengths left None: from the model's window
    fit = PromptWindow(window, settings.gen_length)  # one-line error when gen_length alone does not fit
    texts, chat_applied = item_texts(em.tokenizer, items, args.chat)
    text = diag.token_texts(em.tokenizer, em.mask_id)
    use_reference = graded and (args.reference == "on" or (args.reference == "auto" and args.dataset == "embedded"))
    references = [diag.reference_ids(em.tokenizer, it.reference, settings.gen_length, em.eos_id) if use_reference
                  else None for it in items]

    answers, traces, costs = {}, {}, {}
    for run in runs:
        torch.manual_seed(args.seed)
        trajectory = Trajectory(keep_tokens=True)
        answers[run.label], prompt_len = sample_texts(em, texts, run.settings(settings), chat_applied, fit,
                                                      trajectory)
        traces[run.label] = [diag.row_trace(trajectory, row, prompt_len, em.mask_id) for row in range(len(items))]
        costs[run.label] = {"nfe": trajectory.nfe, "tokens_per_second": trajectory.tokens_per_second,
                            "text": trajectory.cost()}

    decoding = diag.decoding_text(settings, decoding_of(em.model, settings.decoding))
    print(f"(steps {settings.steps}, gen_length {settings.gen_length}, block_length {settings.block_length}) "
          f"{decoding}\n")
    views, files = [], []
    width = max(len(label) for label in answers)
    for i, item in enumerate(items):
        print(f"=== prompt {i}\n{texts[i]}")
        print(f"--- answers (gold {item.gold})" if graded else "--- answers")
        for label in answers:
            correct = grade(args.format, answers[label][i], item.gold)[1] if graded else None
            verdict = "" if correct is None else ("[correct] " if correct else "[wrong] ")
            kinds = Counter(r.kind for r in diag.revisions(traces[label][i], references[i]))
            remasks = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
            print(f"{label:<{width}}  {verdict}{answers[label][i]!r}  (re-maskings: {remasks}; "
                  f"{costs[label]['text']})")
            views.append(diag.TraceView(title=f"prompt {i}, {label} ({costs[label]['text']})",
                                        trace=traces[label][i], text=text,
                                        answer=answers[label][i], reference=references[i], verdict=correct))
        if not args.quiet_steps:
            for label in answers:
                print(f"--- trajectory: {label}")
                print("\n".join(diag.step_lines(traces[label][i], text)))
        if args.png_dir:
            out = Path(args.png_dir)
            files.append(diag.plot_mask_counts({label: traces[label][i] for label in answers},
                                               out / f"mask_counts_p{i}.png", title=f"prompt {i}"))
            for label in answers:
                files.append(diag.plot_trajectory(traces[label][i], text, out / f"trajectory_p{i}_{label}.png",
                                                  references[i], title=f"prompt {i}, {label}"))
        print()
    if args.html:
        intro = (f"steps {settings.steps}, gen_length {settings.gen_length}, block_length {settings.block_length}, "
                 f"temperature {settings.temperature}, ups_temperature {args.ups_temperature}, {decoding}, "
                 f"seed {args.seed}")
        files.append(write_text(args.html, diag.trajectory_html(views, intro=intro)))
    if files:
        print("wrote " + ", ".join(str(f) for f in files))
    return {"answers": answers, "traces": traces, "costs": costs, "files": files}


if __name__ == "__main__":
    run_main(main)
