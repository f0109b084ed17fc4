"""Rollouts for RL and the training rows that score them again (DESIGN.md 11).

    recorder = PolicyRecorder(mask_id, temperature=1.2, ups_temperature=1.2)
    out = sample(bundle, ids, attention_mask, settings, Trajectory(observer=recorder))   # the project's sampler
    trace = recorder.stacked(steps_per_block)        # per (row, block, step): what remask_grpo needs later

A rollout is one answer sampled for a prompt with the project's sampler in a stochastic mode: tokens drawn at
`temperature`, and with the 'ups' source and `ups_temperature` > 0 the kept positions of every step drawn by
Plackett-Luce from softmax(UPS / ups_temperature) over the block (remedi_patches.remasking.plackett_luce_keys).
`PolicyRecorder` sees every step through Trajectory.observer and keeps, per (row, block, step):

    xt        (B, nb, S, N)  the block before the step (the model input x_t)
    candidates(B, nb, S, N)  the proposal x0 (sampled at masked positions, the current token elsewhere)
    order     (B, nb, S, N)  positions by descending ranking key: the first k_i are the ordered Plackett-Luce picks
    token_logp(B, nb, S, N)  log softmax(TPS / temperature)[x0] at rollout time
    pl_logp   (B, nb, S)     Plackett-Luce log-probability of the first k_i of `order`
    unmasked  (B, nb, S, N)  kept and masked before the step: the positions whose token the step chose

`policy_rows` rebuilds the block-causal rows of Remask SFT (remedi_patches.block_layout, [prompt | response | x_t of
step i of every block]) so that one forward per step index scores every block of every rollout again; the noisy
block then sees what the sampler's block saw (the prompt, the finished blocks and itself), so at unchanged weights
the recomputed log-probabilities equal the stored ones. `response_rows` are the plain [prompt | response] rows of
the single-stream methods (diffu_grpo, rwd, dpo).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from remedi_patches.block_layout import RemaskRows, build_rows
from remedi_patches.rl.objectives import plackett_luce_log_prob, token_log_probs

TRACE_KEYS = ("xt", "candidates", "order", "token_logp", "pl_logp", "unmasked")


@dataclass
class PolicyRecorder:
    """Trajectory.observer that records the policy of every sampler step (module doc), on the CPU."""

    mask_id: int
    temperature: float
    ups_temperature: float
    steps: list[dict] = field(default_factory=list)

    def __call__(self, tokens, candidates, logits, ups_logits, confidence, k) -> None:
        order = confidence.argsort(dim=-1, descending=True, stable=True)  # (B, N), picks first
        kept = torch.zeros_like(tokens, dtype=torch.bool).scatter_(-1, order[:, :k], True)
        pl = (plackett_luce_log_prob(ups_logits, order[:, :k], self.ups_temperature) if ups_logits is not None
              else torch.zeros(tokens.shape[0], device=tokens.device))
        self.steps.append({"xt": tokens.clone(), "candidates": candidates, "order": order,
                           "token_logp": token_log_probs(logits, candidates, self.temperature), "pl_logp": pl,
                           "unmasked": kept & (tokens == self.mask_id)})

    def stacked(self, steps_per_block: int) -> dict[str, torch.Tensor]:
        """The recorded steps as (B, nb, S, ...) CPU tensors (module doc)."""
        if not self.steps or len(self.steps) % steps_per_block:
            raise RuntimeError(f"recorded {len(self.steps)} steps, not whole blocks of {steps_per_block}")
        out = {}
        for key in TRACE_KEYS:
            per_step = torch.stack([s[key].cpu() for s in self.steps], dim=1)  # (B, nb * S, ...)
            out[key] = per_step.view(per_step.shape[0], -1, steps_per_block, *per_step.shape[2:])
        return out


def end_blocks(response: torch.Tensor, block_length: int, eos_id: Optional[int]) -> torch.Tensor:
    """(B,) blocks of each response up to and including its first EOS (all blocks when it has none)."""
    b, n = response.shape
    blocks = n // block_length
    if eos_id is None:
        return torch.full((b,), blocks, dtype=torch.long)
    is_eos = (response == eos_id).view(b, blocks, block_length).any(dim=-1)  # (B, nb)
    first = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), torch.full((b,), blocks - 1))
    return first.long() + 1


def completion_mask(response: torch.Tensor, eos_id: Optional[int]) -> torch.Tensor:
    """(B, G) bool: response tokens up to and including the first EOS (d1's completion mask)."""
    if eos_id is None:
        return torch.ones_like(response, dtype=torch.bool)
    seen = (response == eos_id).long().cumsum(dim=1)
    return (seen == 0) | ((seen == 1) & (response == eos_id))


def joined(prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor], response: torch.Tensor,
           eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, Lp) and responses (B, G) -> ((B, Lp + G) rows [real prompt | response | EOS],
    real prompt lengths (B,))."""
    b, lp = prompt.shape
    real = (torch.full((b,), lp, dtype=torch.long, device=prompt.device) if prompt_mask is None
            else prompt_mask.long().sum(dim=1).to(prompt.device))
    full = torch.cat([prompt, response], dim=1)  # (B, Lp + G), each row's real tokens at its end
    width = full.shape[1]
    source = torch.arange(width, device=full.device)[None, :] + (lp - real)[:, None]  # shift out the left padding
    rows = full.gather(1, source.clamp(max=width - 1)).masked_fill(source >= width, eos_id)
    return rows, real


def response_rows(prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor], response: torch.Tensor,
                  eos_id: int) -> RemaskRows:
    """[prompt | response] rows (sequence layout: the response scored, bidirectional attention over real tokens)."""
    ids, real = joined(prompt, prompt_mask, response, eos_id)
    n = response.shape[1]
    return build_rows(ids, real, torch.full_like(real, n), "sequence", n, eos_id)


def policy_rows(prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor], response: torch.Tensor,
                xt: torch.Tensor, valid_blocks: torch.Tensor, block_length: int, eos_id: int) -> RemaskRows:
    """Block-causal rows [prompt | response | x_t] for one step index: xt (B, nb, N) the blocks before that step,
    valid_blocks (B,) the blocks each row decoded (end_blocks). Scored positions (answer_mask) = the x_t copy, in
    block order."""
    ids, real = joined(prompt, prompt_mask, response, eos_id)
    rows = build_rows(ids, real, valid_blocks.to(real.device) * block_length, "block_diffusion", block_length, eos_id)
    flat = xt.reshape(xt.shape[0], -1).to(rows.input_ids.device)  # (B, nb * N)
    input_ids = rows.input_ids.clone()
    input_ids[rows.answer_mask] = flat[positions_valid(valid_blocks, xt.shape[1], block_length).to(flat.device)]
    return rows._replace(input_ids=input_ids)


def scatter_blocks(values: torch.Tensor, valid_blocks: torch.Tensor, nb: int, block_length: int,
                   fill: float = 0.0) -> torch.Tensor:
    """Values of the scored positions (M, ...) in row-major order -> (B, nb, N, ...), `fill` in undecoded blocks."""
    out = values.new_full((valid_blocks.shape[0], nb * block_length, *values.shape[1:]), fill)
    out[positions_valid(valid_blocks, nb, block_length).to(values.device)] = values
    return out.view(valid_blocks.shape[0], nb, block_length, *values.shape[1:])


def blocks_valid(valid_blocks: torch.Tensor, nb: int) -> torch.Tensor:
    """(B,) decoded blocks per row -> (B, nb) bool: the blocks a row decoded (up to its EOS block)."""
    return torch.arange(nb, device=valid_blocks.device)[None, :] < valid_blocks[:, None]


def positions_valid(valid_blocks: torch.Tensor, nb: int, block_length: int) -> torch.Tensor:
    """(B, nb * block_length) bool: the positions of the decoded blocks."""
    return blocks_valid(valid_blocks, nb).repeat_interleave(block_length, dim=1)
