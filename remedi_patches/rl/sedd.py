"""RL on a SEDD (remedi_patches.sedd, backbone kind "sedd"): its rollouts, likelihoods and export (DESIGN.md 13).

    policy = SEDDPolicy.of(model, row_length=longest_prompt + gen_length, eos_id=tokenizer.eos_token_id)
    answers = policy.sample(model, prompt_ids, steps=64, temperature=1.2, generator=g)   # (B, A) EOS-padded
    nll = policy.nll(model, *rows_of(prompt, prompt_mask, answers, policy.row_length), g, elbo=False)   # (B,)

Rows: every rollout (and held-out) row has `row_length` = the longest prompt of the run (training and held-out
prompts) + --gen_length tokens, in the SEDD SFT trainer's layout: prompt i at [0, n_i), then the sampled answer
and its EOS padding up to row_length (remedi_patches.sedd.answers.sample_rows). A prompt shorter than the longest
is answered in more than --gen_length positions; the reward reads the answer up to its first EOS. The prompt is
never perturbed and never scored; the answer and its EOS padding are, as in SFT.

Likelihoods (one Monte Carlo draw of t ~ U(eps, 1) and x_t per row; a generator per micro-batch, so
--micro_batch_size changes the draws, not their distribution):
  rwd  the score-entropy loss of each rollout (remedi_patches.sedd.losses.score_entropy_loss, per_sequence: the sum
       over its answer positions of dsigma x score entropy, nats), weighted by max(A, 0) and divided by the global
       rollout count;
  dpo  minus score_entropy_elbo (its n_samples 1), policy and reference scored under two generators seeded alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from lit_gpt.training import latest_checkpoint, require_finite
from remedi_patches.backbones import Backbone, unwrap
from remedi_patches.cli import UserError
from remedi_patches.sedd import SEDD, save_sedd
from remedi_patches.sedd.answers import DEFAULT_PREDICTOR, graph_and_noise, sample_rows
from remedi_patches.sedd.losses import score_entropy_elbo, score_entropy_loss

SEDD_METHODS = ("rwd", "dpo")


def refuse_inapplicable(cfg) -> None:
    """UserError for the RL flags a SEDD cannot serve (RLConfig cfg): the GRPO methods, LoRA, a confidence
    ranking. --block_length and --ups_temperature are ignored, as the methods that do not use them ignore them."""
    if cfg.method not in SEDD_METHODS:
        raise UserError(f"--method {cfg.method} needs a masked-diffusion model's token log-probabilities; "
                        f"{cfg.model_name} is a SEDD (score entropy): use --method rwd or dpo")
    if cfg.train_weights != "full":
        raise UserError(f"{cfg.model_name} is a SEDD, whose tools load no LoRA adapters: use --train_weights full")
    if cfg.confidence_source is not None:
        raise UserError(f"{cfg.model_name} is a SEDD, whose sampler ranks no positions: drop --confidence_source")
    for name in ("gen_length", "steps", "eval_steps"):  # steps: the SEDD's reverse-diffusion steps
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(cfg, name)}")


def row_length(prompt_ids: Sequence[Sequence[int]], gen_length: int, window: int) -> int:
    """The common row length: the longest prompt + gen_length; UserError naming --gen_length when past the window."""
    longest = max(len(ids) for ids in prompt_ids)
    if longest + gen_length > window:
        fix = (f"lower --gen_length to at most {window - longest}" if longest < window else
               "shorten the prompts (--prompt_template, --dataset)")
        raise UserError(f"prompts of up to {longest} tokens + --gen_length {gen_length} exceed the SEDD's window of "
                        f"{window} (config model.length); {fix}")
    return longest + gen_length


def answers_of(rows: torch.Tensor, prompt_len: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, L) rows, (B,) prompt lengths -> (B, L - min n) the answers moved to column 0, EOS-padded on the right."""
    width = rows.shape[1] - int(prompt_len.min())
    padded = torch.cat([rows, rows.new_full((rows.shape[0], width), eos_id)], dim=1)  # (B, L + width)
    index = prompt_len[:, None].to(rows.device) + torch.arange(width, device=rows.device)  # (B, width)
    return padded.gather(1, index)


def rows_of(prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor], answers: torch.Tensor,
            length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, P) (mask (B, P) or None) + answers (B, A) -> (x0 (B, length), prompt positions
    (B, length) bool): each row is [real prompt | answer] cut to `length`, the SFT layout."""
    b, p = prompt.shape
    n = torch.full((b,), p) if prompt_mask is None else prompt_mask.sum(dim=1).long()  # (B,)
    both = torch.cat([prompt, answers], dim=1)  # (B, P + A)
    index = (p - n)[:, None] + torch.arange(length)  # (B, length): the real prompt starts at p - n
    return both.gather(1, index), torch.arange(length)[None, :] < n[:, None]


@dataclass
class SEDDPolicy:
    """What the RL trainer does with a SEDD: sample answers, score rollouts, export."""

    graph: object
    noise: object
    row_length: int
    eos_id: int
    predictor: str = DEFAULT_PREDICTOR

    @classmethod
    def of(cls, model: torch.nn.Module, row_length: int, eos_id: Optional[int]) -> "SEDDPolicy":
        if eos_id is None:
            raise UserError("the SEDD's tokenizer has no EOS token (the answers' padding); pass --tokenizer")
        graph, noise = graph_and_noise(unwrap(model))
        return cls(graph, noise, row_length, eos_id)

    def sample(self, model, prompt_ids: Sequence[Sequence[int]], steps: int, temperature: float,
               generator: torch.Generator) -> torch.Tensor:
        """One sampler call: (B, row_length - shortest prompt) answers on the CPU, EOS-padded (answers_of)."""
        rows = sample_rows(model, prompt_ids, self.row_length, steps=steps, predictor=self.predictor,
                           temperature=temperature, generator=generator)  # (B, row_length)
        return answers_of(rows.cpu(), torch.tensor([len(ids) for ids in prompt_ids]), self.eos_id)

    def nll(self, model, x0: torch.Tensor, prompt_mask: torch.Tensor, generator: torch.Generator,
            elbo: bool) -> torch.Tensor:
        """(B,) minus the log-likelihood estimate of each row's answer given its prompt (module doc): the score-entropy
        loss (rwd), or the negative ELBO (dpo). Gradients reach `model` (called directly: score_fn_of is no_grad)."""
        if elbo:  # the model is the score function: model(x_t, sigma) -> log scores (B, L, V)
            return score_entropy_elbo(model, self.graph, self.noise, x0, prompt_mask, n_samples=1, generator=generator)
        return score_entropy_loss(model, self.graph, self.noise, x0, prompt_mask=prompt_mask,
                                  generator=generator).per_sequence


def export_sedd(fabric, out_dir: Path, backbone: Backbone, target: Path) -> None:
    """The trained SEDD of the newest checkpoint in `out_dir` (a full state dict, whatever the strategy) as a hub-
    layout folder with the tokenizer (save_sedd), which load_backbone reads as kind "sedd"."""
    if fabric.global_rank == 0:
        state = torch.load(latest_checkpoint(out_dir), map_location="cpu", weights_only=True, mmap=True)["model"]
        with torch.device("meta"):
            model = SEDD(unwrap(backbone.model).config)
        model.load_state_dict(state, assign=True)
        require_finite(model, f"the model for {target}", "Train again with a lower learning rate.")
        save_sedd(model, target, backbone.tokenizer)
    fabric.barrier()
