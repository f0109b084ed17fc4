"""Masked-diffusion sampling for LLaDA-style models, with RemeDi dynamic remasking, and its CLI.

    generate(model, prompt, ...)              upstream LLaDA's sampler when confidence_source is None
    generate(..., confidence_source="ups",    RemeDi: keep the top-k_i block positions by UPS confidence,
             ups_head=head)                   re-mask the others (DESIGN.md 3.2)
    python generate.py --help                 the command line
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from remedi_patches.confidence import CONFIDENCE_SOURCES, ConfidenceInputs, get_confidence_source
from remedi_patches.modeling_wrappers import UPSModel, logits_of
from remedi_patches.remasking import (Trajectory, commit_counts, commit_schedule, commit_top_n, keep_top_k, rank_last,
                                     remask_block)

logger = logging.getLogger(__name__)

# upstream `remasking=` rule -> the confidence source that reproduces it on masked positions only
UPSTREAM_RULES = {"low_confidence": "tps_prob", "random": "random"}
DEFAULT_PROMPT = ("Mia has 14 shells. She finds 7 more. She gives away 9. She doubles them. "
                  "How many shells does Mia have now?")


def sample_candidates(block_logits: torch.Tensor, temperature: float, seq_len: int, block: slice) -> torch.Tensor:
    """Gumbel-max token per block position: (B, N, V) -> (B, N).

    argmax(exp(logits) / (-log u) ** temperature) in float64, u ~ U(0, 1); temperature 0 is a plain
    argmax and draws nothing. u is drawn for the whole (B, L, V) sequence, as upstream does, so the
    global RNG stream (and hence the tokens for a seed) matches upstream; only the block is used.
    """
    if temperature == 0:
        return block_logits.argmax(dim=-1)
    b, _, vocab = block_logits.shape
    u = torch.rand((b, seq_len, vocab), dtype=torch.float64, device=block_logits.device)[:, block]
    return (block_logits.double().exp() / (-u.log()) ** temperature).argmax(dim=-1)


def _block_scores(model: nn.Module, x: torch.Tensor, attention_mask: Optional[torch.Tensor], block: slice,
                  cfg_scale: float, uncond_positions: torch.Tensor,
                  mask_id: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One forward -> (TPS logits of the block after CFG (B, N, V), UPS logits of the block (B, N) or None)."""
    b = x.shape[0]
    if cfg_scale > 0:  # unconditional copy: prompt masked; logits = un + (cfg + 1)(cond - un)
        output = model(torch.cat([x, x.masked_fill(uncond_positions, mask_id)]), attention_mask=attention_mask)
        logits = logits_of(output)
        cond, uncond = logits[:b, block], logits[b:, block]
        block_logits = uncond + (cfg_scale + 1) * (cond - uncond)
    else:
        output = model(x, attention_mask=attention_mask)
        block_logits = logits_of(output)[:, block]
    ups_logits = getattr(output, "ups_logits", None)  # from the conditional half under CFG
    return block_logits, None if ups_logits is None else ups_logits[:b, block]


def _check_inputs(prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale, remasking,
                  mask_id, confidence_source, logits_eos_inf, confidence_eos_eot_inf, eos_id) -> int:
    """Raise one ValueError naming the problem and the fix; return the steps per block."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype.is_floating_point \
            or prompt.dtype == torch.bool:
        raise ValueError("prompt must be a (batch, length) integer tensor of token ids; "
                         "for one prompt pass ids[None] or tokenizer(..., return_tensors='pt').input_ids")
    if prompt.numel() == 0:
        raise ValueError(f"prompt is empty (shape {tuple(prompt.shape)}); give at least one prompt token "
                         "(a BOS token will do for unconditional generation)")
    if attention_mask is not None:
        if attention_mask.shape != prompt.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but prompt has "
                             f"{tuple(prompt.shape)}; pass the mask the tokenizer returned with the prompt")
        if (attention_mask.sum(dim=-1) == 0).any():
            raise ValueError("a row of attention_mask is all zeros, i.e. an empty prompt; drop that row")
    if (prompt == mask_id).any():
        raise ValueError(f"prompt contains the mask id {mask_id}; remove [MASK] tokens from the prompt "
                         "or pass the right mask_id for this model")
    if min(steps, gen_length, block_length) <= 0:
        raise ValueError(f"steps, gen_length and block_length must be positive, got {steps}, {gen_length}, "
                         f"{block_length}")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not a multiple of block_length={block_length}; "
                         "pick a block_length that divides gen_length")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} is not a multiple of the number of blocks {num_blocks} "
                         f"(gen_length / block_length); use steps = a multiple of {num_blocks}")
    if steps > gen_length:
        raise ValueError(f"steps={steps} > gen_length={gen_length}: some steps would commit no token "
                         "(and steps per block would exceed block_length); use steps <= gen_length")
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature ({temperature}) and cfg_scale ({cfg_scale}) must be >= 0")
    if remasking not in UPSTREAM_RULES:
        raise ValueError(f"unknown remasking {remasking!r}; use one of {sorted(UPSTREAM_RULES)}")
    if confidence_source is not None:
        get_confidence_source(confidence_source)
    if (logits_eos_inf or confidence_eos_eot_inf) and eos_id is None:
        raise ValueError("logits_eos_inf / confidence_eos_eot_inf need eos_id; pass the tokenizer's EOS id")
    return steps // num_blocks


@torch.no_grad()  # not inference_mode: callers may feed the tokens to a training forward
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128, temperature=0.,
             cfg_scale=0., remasking='low_confidence', mask_id=126336, logits_eos_inf=False,
             confidence_eos_eot_inf=False, *, confidence_source=None, ups_head=None, remask=True,
             eos_id=126081, eot_id=126348, trajectory: Optional[Trajectory] = None) -> torch.Tensor:
    """Fill gen_length masked positions after `prompt` by masked-diffusion denoising.

    Args:
        model: mask predictor; model(x, attention_mask=am) returns logits (B, L, V), an object with
            .logits, or a RemeDiOutput (.logits, .ups_logits).
        prompt: (B, Lp) token ids, left-padded when B > 1; attention_mask: (B, Lp) of 1/0 or None.
        steps, gen_length, block_length: gen_length // block_length blocks, steps // num_blocks steps
            each; per step a block of B masks commits n_i tokens (even split, remainder early).
        temperature: Gumbel-max sampling temperature in float64 (0 = argmax).
        cfg_scale: classifier-free guidance; the unconditional copy masks the prompt and
            logits = un + (cfg_scale + 1) * (cond - un). Works with and without attention_mask.
        remasking: upstream rule used when confidence_source is None: 'low_confidence' ranks masked
            positions by the probability of their candidate, 'random' by uniform noise.
        logits_eos_inf: EOS logit set to -inf before sampling (EOS is never a candidate).
        confidence_eos_eot_inf: positions whose candidate is EOS or EoT rank after every other
            candidate of the block (in every mode, at every temperature): they are committed only
            when nothing else is left to commit that step. Their confidences are shifted below the
            others rather than set to -inf, so top-k never reaches positions it must not choose.
            (Upstream sets the EOS logit to -inf in the Gumbel-noised copy, which is the logits
            tensor itself only at temperature 0, so its EOS gating is lost at temperature > 0.)
        confidence_source: None = upstream; else a name in remedi_patches.confidence.CONFIDENCE_SOURCES
            ('ups', 'tps_prob', 'random', 'margin', 'entropy'): per step keep the top-k_i positions
            of the block by that confidence (k_i = n_1 + ... + n_i) and re-mask the others.
            'ups' with no head and a model giving no ups_logits logs a warning and uses 'tps_prob'.
        ups_head: UPSHead on the model's last hidden state (used by 'ups' only, on its device).
        remask: False restricts the choice to masked positions (committed tokens stay), so
            'tps_prob' equals upstream 'low_confidence'. Upstream mode (confidence_source None)
            never re-masks, whatever this says.
        eos_id, eot_id: ids gated by the two flags above (eot_id may be None).
        trajectory: a remedi_patches.remasking.Trajectory to append one StepRecord per step to.
    Returns:
        (B, Lp + gen_length) token ids; the prompt is returned unchanged and no mask is left.
    Same model, inputs and seed as upstream LLaDA give the same tokens (global torch RNG, same order).
    """
    steps_per_block = _check_inputs(prompt, attention_mask, steps, gen_length, block_length, temperature,
                                    cfg_scale, remasking, mask_id, confidence_source, logits_eos_inf,
                                    confidence_eos_eot_inf, eos_id)
    if confidence_source is None:
        source_name, remask = UPSTREAM_RULES[remasking], False
    else:
        source_name = confidence_source
    if ups_head is not None and source_name == "ups":
        if isinstance(model, UPSModel):
            raise ValueError("model is already a UPSModel with its own head; do not also pass ups_head")
        model = UPSModel(model, ups_head)
    source = get_confidence_source(source_name)

    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt
    uncond_positions = x != mask_id  # (B, L) the prompt, padding included
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=1)
        if cfg_scale > 0:
            attention_mask = torch.cat([attention_mask, attention_mask])
    n_per_step = commit_counts(block_length, steps_per_block)  # n_1..n_S
    k_per_step = commit_schedule(block_length, steps_per_block)  # k_1..k_S, k_i = n_1 + ... + n_i

    for b in range(gen_length // block_length):
        block = slice(prompt_len + b * block_length, prompt_len + (b + 1) * block_length)
        for i, (n, k) in enumerate(zip(n_per_step, k_per_step)):
            logits, ups_logits = _block_scores(model, x, attention_mask, block, cfg_scale, uncond_positions,
                                               mask_id)  # (B, N, V), (B, N) | None
            if source_name == "ups" and ups_logits is None:
                logger.warning("confidence_source='ups' but no UPS head was given and the model returns no "
                               "ups_logits; falling back to 'tps_prob'. Pass ups_head= (CLI: --ups_head).")
                source_name, source = "tps_prob", get_confidence_source("tps_prob")
            if (logits_eos_inf or confidence_eos_eot_inf) and eos_id >= logits.shape[-1]:
                raise ValueError(f"eos_id={eos_id} is outside the model's vocabulary of {logits.shape[-1]} "
                                 "logits; pass the tokenizer's EOS id")
            if logits_eos_inf:
                logits[..., eos_id] = -torch.inf
            tokens = x[:, block]  # (B, N)
            masked = tokens == mask_id
            candidates = torch.where(masked, sample_candidates(logits, temperature, x.shape[1], block), tokens)
            confidence = source(ConfidenceInputs(logits, candidates, ups_logits, x.shape[1], block))  # (B, N)
            if confidence_eos_eot_inf:
                end = candidates == eos_id
                if eot_id is not None:
                    end |= candidates == eot_id
                confidence = rank_last(confidence, end)
            if remask:
                keep = keep_top_k(confidence, k)
            else:
                keep = ~masked | commit_top_n(confidence, masked, n, x.shape[1], block.start)
            new_tokens, committed, remasked = remask_block(tokens, candidates, keep, mask_id)
            x[:, block] = new_tokens
            if trajectory is not None:
                trajectory.record(b, i, block.start, committed, remasked, (new_tokens == mask_id).sum(dim=-1), x)
    return x


def encode_prompts(tokenizer, prompts: list[str], chat: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> left-padded (ids, attention_mask); chat 'auto' applies the tokenizer's chat template if any."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise ValueError("--chat on, but the tokenizer has no chat template; use --chat off for base models")
    use_chat = chat == "on" or (chat == "auto" and has_template)
    if use_chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in prompts]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=not use_chat)
    return enc["input_ids"], enc["attention_mask"]


def decode_answers(tokenizer, out: torch.Tensor, prompt_len: int, stop_ids: list[int]) -> list[str]:
    """Answer part of each row, cut at the first stop token (EOS / EoT), without special tokens."""
    answers = []
    for row in out[:, prompt_len:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return answers


def format_trajectory(trajectory: Trajectory, answer_start: int) -> str:
    """One line per row and step; positions are counted from the start of the answer."""
    lines = []
    for row in range(trajectory.steps[0].mask_count.shape[0] if trajectory.steps else 0):
        for rec in trajectory.steps:
            offset = rec.start - answer_start
            committed = (rec.committed[row].nonzero().flatten() + offset).tolist()
            remasked = (rec.remasked[row].nonzero().flatten() + offset).tolist()
            lines.append(f"row {row} block {rec.block} step {rec.step}: masks left {int(rec.mask_count[row])}, "
                         f"committed {committed}, re-masked {remasked}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample from a masked-diffusion LM (LLaDA / SMDM), optionally with "
                                "RemeDi dynamic remasking.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="local model folder, SMDM checkpoint/export or hub name; "
                   "None = the embedded tiny model")
    p.add_argument("--smdm_size", default=None, help="architecture of an SMDM .pth checkpoint, e.g. Diff_LLaMA_170M")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub name when the model has none")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt text; repeat for a batch (None = one built-in question: {DEFAULT_PROMPT!r})")
    p.add_argument("--chat", choices=["auto", "on", "off"], default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: when the tokenizer has one; the "
                   "embedded model's prompt format is applied by on / auto)")
    p.add_argument("--steps", type=int, default=128, help="denoising steps in all, a multiple of the block count")
    p.add_argument("--gen_length", type=int, default=128, help="answer tokens to generate")
    p.add_argument("--block_length", type=int, default=32, help="semi-autoregressive block size; divides gen_length")
    p.add_argument("--temperature", type=float, default=0.0, help="Gumbel sampling temperature (0 = argmax)")
    p.add_argument("--cfg_scale", type=float, default=0.0, help="classifier-free guidance scale (0 = off)")
    p.add_argument("--remasking", choices=sorted(UPSTREAM_RULES), default="low_confidence",
                   help="upstream rule, used when --confidence_source is not given")
    p.add_argument("--mask_id", type=int, default=None, help="None = the loaded backbone's mask id")
    p.add_argument("--confidence_source", choices=sorted(CONFIDENCE_SOURCES), default=None,
                   help="RemeDi dynamic remasking by this confidence; None = upstream sampling")
    p.add_argument("--no_remask", action="store_true", help="never re-mask committed tokens (ranking only)")
    p.add_argument("--ups_head", default=None, help="UPS head .safetensors (or its folder) for --confidence_source ups")
    p.add_argument("--lora_path", default=None, help="PEFT LoRA adapter folder to apply to the backbone")
    p.add_argument("--logits_eos_inf", action="store_true", help="never sample EOS")
    p.add_argument("--confidence_eos_eot_inf", action="store_true",
                   help="commit EOS / EoT candidates after all other candidates of a block")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before sampling")
    p.add_argument("--show_trajectory", action="store_true", help="print committed / re-masked positions per step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA, the checkpoint's dtype otherwise")
    return p


def main(argv: Optional[list[str]] = None) -> list[str]:
    smdm = str(Path(__file__).resolve().parent / "SMDM")  # lit_gpt, for a clone that is not pip-installed
    if smdm not in sys.path:
        sys.path.append(smdm)
    from remedi_patches.backbones import load_eval_model

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    em = load_eval_model(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                         lora_path=args.lora_path, ups_head=args.ups_head, mask_id=args.mask_id,
                         smdm_size=args.smdm_size)  # backbone, then LoRA, then UPS head (checked to fit)
    prompts, chat = args.prompt or [DEFAULT_PROMPT], args.chat
    if args.model in (None, "embedded") and chat != "off":  # the embedded task's own prompt format
        from remedi_patches.embedded import format_prompt

        prompts, chat = [format_prompt(p) for p in prompts], "off"
    ids, attention_mask = encode_prompts(em.tokenizer, prompts, chat)
    ids, attention_mask = ids.to(em.device), attention_mask.to(em.device)
    trajectory = Trajectory() if args.show_trajectory else None
    torch.manual_seed(args.seed)
    out = generate(em.model, ids, attention_mask, steps=args.steps, gen_length=args.gen_length,
                   block_length=args.block_length, temperature=args.temperature, cfg_scale=args.cfg_scale,
                   remasking=args.remasking, mask_id=em.mask_id, logits_eos_inf=args.logits_eos_inf,
                   confidence_eos_eot_inf=args.confidence_eos_eot_inf, confidence_source=args.confidence_source,
                   ups_head=em.ups_head, remask=not args.no_remask, eos_id=em.eos_id, eot_id=em.eot_id,
                   trajectory=trajectory)
    answers = decode_answers(em.tokenizer, out, ids.shape[1], em.stop_ids)
    for prompt, answer in zip(prompts, answers):
        print(f"### prompt\n{prompt}\n### answer\n{answer}\n")
    if trajectory is not None:
        print(format_trajectory(trajectory, ids.shape[1]))
    return answers


if __name__ == "__main__":
    main()
