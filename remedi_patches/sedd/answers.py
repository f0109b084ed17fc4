"""Prompts in, answers out, on a loaded SEDD (what SMDM/sedd/sample.py, the benchmark and the RL trainer share).

sample_answers: one sampler call per prompt, (num_samples, n + gen_length) rows with the prompt at [0, n).
sample_rows:    all prompts in one call, in the SFT trainer's row layout (prompt, answer, EOS padding).
encode_prompt / decode_ids: text <-> ids as the SFT trainer encodes prompts; [MASK] shown for absorbing-state ids.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from remedi_patches.sedd.graphs import graph_from_config
from remedi_patches.sedd.noise import noise_from_config
from remedi_patches.sedd.sampling import sample

DEFAULT_STEPS = 128  # upstream's configs: sampling.steps = 128
DEFAULT_PREDICTOR = "analytic"  # upstream's sampling scripts (run_sample*.py) use the analytic (Tweedie) predictor
MASK_TEXT = "[MASK]"


# ---------------------------------------------------------------- the model as the samplers take it


def score_fn_of(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """score_fn(x, sigma) -> log_score, as remedi_patches.sedd.sampling.sample takes it (no grad)."""
    def score_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x, sigma)
    return score_fn


def graph_and_noise(model: torch.nn.Module):
    """The graph and noise schedule a loaded SEDD was trained with (from its upstream config)."""
    config = model.config.to_upstream_dict()
    return graph_from_config(config, model.config.tokens), noise_from_config(config)


def sample_answers(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], gen_length: int, *,
                   steps: int = DEFAULT_STEPS, predictor: str = DEFAULT_PREDICTOR, denoise: bool = True,
                   num_samples: int = 1, generator: Optional[torch.Generator] = None, temperature: float = 1.0,
                   callback: Optional[Callable[[int, int, float, torch.Tensor], None]] = None) -> list[torch.Tensor]:
    """One sampler call per prompt: (num_samples, len(prompt) + gen_length) long ids each, the prompt at [0, n) of
    every row. An empty prompt ([]) gives unconditional samples of gen_length tokens.

    callback(prompt_index, step, t, x) after each predictor step. ValueError when prompt + gen_length does not fit
    the model's window."""
    window = model.config.length
    device = next(model.parameters()).device
    graph, noise = graph_and_noise(model)
    score_fn = score_fn_of(model)
    out = []
    for i, ids in enumerate(prompt_ids):
        n = len(ids)
        if n + gen_length > window:
            raise ValueError(f"--gen_length {gen_length} after a prompt of {n} tokens needs {n + gen_length} "
                             f"positions, more than the model's window of {window} (config model.length); lower "
                             f"--gen_length to at most {window - n} or shorten the prompt")
        prefix = torch.tensor(list(ids), dtype=torch.long, device=device) if n else None
        step_cb = None if callback is None else (lambda step, t, x, i=i: callback(i, step, t, x))
        out.append(sample(score_fn, graph, noise, (num_samples, n + gen_length), steps, predictor=predictor,
                          denoise=denoise, prefix=prefix, device=device, generator=generator, callback=step_cb,
                          temperature=temperature))
    return out


def sample_rows(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], row_length: int, *,
                steps: int = DEFAULT_STEPS, predictor: str = DEFAULT_PREDICTOR, denoise: bool = True,
                generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> torch.Tensor:
    """All prompts in one sampler call, in the SFT trainer's row layout: (B, row_length) ids, row i holding prompt i
    at [0, n_i) and the sampled answer (then EOS padding, as trained) in [n_i, row_length). ValueError when a prompt
    leaves no answer position or the rows exceed the model's window."""
    if row_length > model.config.length:
        raise ValueError(f"rows of {row_length} tokens exceed the model's window of {model.config.length}")
    longest = max((len(ids) for ids in prompt_ids), default=0)
    if not prompt_ids or longest >= row_length or min(len(ids) for ids in prompt_ids) < 1:
        raise ValueError(f"every prompt needs 1 to {row_length - 1} tokens in rows of {row_length}")
    device = next(model.parameters()).device
    prefix = torch.zeros(len(prompt_ids), longest, dtype=torch.long, device=device)  # (B, Lp), right-padded
    prefix_mask = torch.zeros_like(prefix, dtype=torch.bool)
    for i, ids in enumerate(prompt_ids):
        prefix[i, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        prefix_mask[i, :len(ids)] = True
    graph, noise = graph_and_noise(model)
    return sample(score_fn_of(model), graph, noise, (len(prompt_ids), row_length), steps, predictor=predictor,
                  denoise=denoise, prefix=prefix, prefix_mask=prefix_mask, device=device, generator=generator,
                  temperature=temperature)


# ---------------------------------------------------------------- text


def decode_ids(tokenizer, ids: Sequence[int], mask_id: Optional[int], stop_ids: Sequence[int] = ()) -> str:
    """Text of `ids` cut at the first stop id; each absorbing-state id (left by --no_denoise) shows as [MASK]."""
    ids = [int(t) for t in ids]
    for k, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:k]
            break
    parts, run = [], []
    for t in ids:
        if mask_id is not None and t == mask_id:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(MASK_TEXT)
        else:
            run.append(t)
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids with the tokenizer's own special tokens, as the SFT trainer encodes prompts
    (remedi_patches.data.build_sft_examples); GPT-2's tokenizer adds none, so upstream's raw ids are unchanged."""
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError(f"--prompt {prompt!r} encodes to no tokens; give some text")
    return list(ids)
