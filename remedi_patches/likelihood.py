"""Monte Carlo log-likelihood of an answer under a masked-diffusion LM (LLaDA's conditional estimator).

For a prompt p and an answer a of T tokens,

    log p(a | p)  >=  -E_l [ (T / l) * sum_{i masked} CE(model(p, a_l)_i, a_i) ]

where a_l is the answer with l of its T tokens masked uniformly at random (the prompt stays clean).
The expectation is estimated from mc_num rows in minibatches of batch_size rows. Per minibatch one
level k ~ U{1..T} is drawn and the rows take batch_size evenly spaced mask counts k, k + T/b, ...
(rounded, wrapped into 1..T), so each minibatch covers the noise levels evenly; each row masks its
count of answer positions chosen by a random permutation. A row's loss is the summed cross-entropy
of its masked tokens divided by its mask ratio l / T; the estimate is minus the mean row loss.

Random draws use the global torch RNG in upstream LLaDA's order (per minibatch: the level k, then one
permutation per row), so the same seed gives the same estimate as upstream's eval_llada.py.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, L) ids -> (B, L, V) logits


def stratified_mask_counts(k: int, rows: int, target_len: int) -> torch.Tensor:
    """(rows,) mask counts in 1..T: `rows` evenly spaced levels from k, rounded and wrapped."""
    levels = torch.linspace(float(k), k + (rows - 1) * (target_len / rows), steps=rows)
    return (torch.round(levels).long() - 1) % target_len + 1


def random_answer_mask(counts: torch.Tensor, prompt_len: int, target_len: int) -> torch.Tensor:
    """(rows, Lp + T) bool: row j masks counts[j] answer positions picked by a random permutation."""
    ranks = torch.arange(target_len).expand(len(counts), target_len)  # (rows, T)
    masked = ranks < counts.unsqueeze(1)
    masked = torch.stack([row[torch.randperm(target_len)] for row in masked])
    return torch.cat([torch.zeros(len(counts), prompt_len, dtype=torch.bool), masked], dim=1)


def guided_logits(logits_fn: LogitsFn, x: torch.Tensor, prompt_len: int, cfg_scale: float,
                  mask_id: int) -> torch.Tensor:
    """Logits of x (B, L); with cfg_scale > 0, un + (cfg + 1) (cond - un) where `un` sees the prompt masked."""
    if cfg_scale <= 0:
        return logits_fn(x)
    uncond = x.clone()
    uncond[:, :prompt_len] = mask_id
    cond, un = logits_fn(torch.cat([x, uncond])).chunk(2, dim=0)
    return un + (cfg_scale + 1) * (cond - un)


def minibatch_loss(logits: torch.Tensor, clean: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor,
                   target_len: int) -> float:
    """Mean over rows of (sum of masked-token CE) / (count / T).

    logits (B, L, V), clean (B, L) ids, masked (B, L) bool, counts (B,) masked answer tokens per row.
    """
    ratio = (counts.float() / target_len).unsqueeze(1).expand_as(masked)  # (B, L) mask ratio per row
    ce = F.cross_entropy(logits[masked].float(), clean[masked], reduction="none")
    return float((ce / ratio.to(ce.device)[masked]).sum() / masked.shape[0])


@torch.no_grad()
def mc_loglikelihood(logits_fn: LogitsFn, prefix: torch.Tensor, target: torch.Tensor, *, mask_id: int,
                     mc_num: int = 128, batch_size: int = 32, cfg_scale: float = 0.0) -> float:
    """Estimate log p(target | prefix); prefix (Lp,) and target (T,) are 1-D id tensors on the model's device."""
    if mc_num < 1 or batch_size < 1 or mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of batch_size ({batch_size}); "
                         "e.g. mc_num=128 with batch_size=32")
    target_len, prompt_len = len(target), len(prefix)
    if target_len == 0:
        raise ValueError("the continuation is empty after tokenisation; a log-likelihood needs at least one token")
    device = target.device
    clean = torch.cat([prefix, target]).unsqueeze(0).expand(batch_size, -1)  # (b, Lp + T)
    losses = []
    for _ in range(mc_num // batch_size):
        k = int(torch.randint(1, target_len + 1, (), device=device))
        counts = stratified_mask_counts(k, batch_size, target_len)
        masked = random_answer_mask(counts, prompt_len, target_len).to(device)
        noisy = clean.masked_fill(masked, mask_id)
        logits = guided_logits(logits_fn, noisy, prompt_len, cfg_scale, mask_id)
        losses.append(minibatch_loss(logits, clean, masked, counts, target_len))
    return -sum(losses) / len(losses)
