"""The maths of RL for diffusion LMs (DESIGN.md 11): pure tensor functions, no model, no I/O.

Policy of a dual-stream RemeDi at one denoising step of a block: the tokens proposed at the masked positions
(x0 ~ softmax(TPS logits / tau)) times the order in which the block's positions are kept (a Plackett-Luce draw of
k_i positions from w = softmax(UPS / tau_ups), remedi_patches.remasking.plackett_luce_keys). Their log-probabilities:

    token_log_probs      log softmax(logits / tau)[x0]                                      per position
    plackett_luce_log_prob  sum_j [log w_{o_j} - log(sum of w over positions not yet picked)]  per ordered pick o_1..o_k

GRPO (remask_grpo, diffu_grpo): `group_advantages` A = (r - mean_group) / (std_group + 1e-4) (unbiased std; d1 uses
r - mean only), `clipped_surrogate` -min(rho A, clip(rho, 1 - eps, 1 + eps) A) with rho = exp(new - old), `kl_k3`
the k3 estimator exp(ref - new) - (ref - new) - 1 of KL(new || ref). Reward-weighted denoising weights the
masked-diffusion loss by `reward_weights`; diffusion DPO is `dpo_loss` on ELBO estimates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ADV_EPS = 1e-4  # the std floor of RemeDi's and d1's advantages


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`: logits (..., V), tokens (...) -> (...) float32."""
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    return scaled.log_softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def plackett_luce_log_prob(scores: torch.Tensor, order: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of drawing the positions `order` in that order, without replacement, from
    w = softmax(scores / temperature).

    scores (..., N) float; order (..., k) long, distinct positions (k <= N); returns (...) float32. This scores the
    ordering, not only the set: the denominator of pick j sums w over every position not among o_1..o_{j-1}.
    """
    z = scores.float() / temperature  # (..., N)
    picked = z.gather(-1, order)  # (..., k) in pick order
    chosen = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, order, True)
    rest = z.masked_fill(chosen, -torch.inf).logsumexp(dim=-1, keepdim=True)  # (..., 1) never picked
    tail = picked.flip(-1).logcumsumexp(dim=-1).flip(-1)  # (..., k): logsumexp of picks j..k
    return (picked - torch.logaddexp(tail, rest)).sum(dim=-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """rewards (N,) of N / group_size groups of consecutive rollouts of one prompt -> (N,) advantages
    r - mean_group, divided by (unbiased std_group + 1e-4) when `scale`. A group of equal rewards gives zeros."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(adv)
        adv = adv / (std + ADV_EPS)
    equal = r.amax(dim=1) == r.amin(dim=1)  # exactly zero, not the rounding residue of the float mean / 1e-4
    return adv.masked_fill(equal[:, None], 0.0).view(-1)


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip per element: (loss -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho, clipped: the clip was active).
    log_ratio = new - old log-probability; advantages broadcast against it."""
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), ratio, clipped < unclipped


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(policy || reference) per sample: exp(ref - new) - (ref - new) - 1 (>= 0, 0 when equal)."""
    delta = ref_log_probs - log_probs
    return delta.exp() - delta - 1


def reward_weights(advantages: torch.Tensor) -> torch.Tensor:
    """Reward-weighted denoising: each rollout's weight on its masked-diffusion loss, max(A, 0) of its group
    advantage (rollouts above their group's mean are imitated in proportion; the loss stays a bounded NLL)."""
    return advantages.clamp(min=0)


def dpo_loss(nll_chosen: torch.Tensor, nll_rejected: torch.Tensor, ref_nll_chosen: torch.Tensor,
             ref_nll_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion DPO per pair: -log sigmoid(beta [(log pi_c - log ref_c) - (log pi_r - log ref_r)]), each log
    p replaced by minus its masked-diffusion loss (the ELBO) under the same noise for policy and reference."""
    margin = (ref_nll_chosen - nll_chosen) - (ref_nll_rejected - nll_rejected)
    return -F.logsigmoid(beta * margin)
