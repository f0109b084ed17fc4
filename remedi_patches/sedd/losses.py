"""SEDD score-entropy loss and ELBO (DESIGN.md 13; reference/sedd_fastdllm_d1.md part 1, "Loss").

For clean sequences x0 (B, L) and a time t per sequence: sigma, dsigma = noise(t); x_t ~ exp(sigma Q)(x0, .) per
position; log s = score_fn(x_t, sigma) (B, L, V); the loss of a sequence is

    sum over scored positions i of dsigma * SE_i(log s, sigma, x_t, x0),

a one-sample Monte Carlo estimate (over t ~ U(eps, 1) and x_t) of the diffusion negative ELBO's integral.

Prefix / SFT conditioning (the guide's prompt masking, which upstream lacks): positions where `prompt_mask` is True
are never perturbed (x_t = x0 there) and never scored (left out of the sum), so the loss is that of the response
given a clean prompt.

`score_fn(x (B, L) long, sigma (B,) float) -> log_score (B, L, V)` is all that is assumed of the model.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from remedi_patches.sedd.graphs import Graph
from remedi_patches.sedd.noise import Noise

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ScoreEntropyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, mean of per_sequence over the batch
    per_sequence: torch.Tensor  # (B,) sum over scored positions of dsigma * SE


def sample_times(b: int, eps: float = 1e-3, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """t ~ U(eps, 1) per sequence, (b,) float32."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}; upstream uses 1e-3")
    return eps + (1.0 - eps) * torch.rand(b, device=device, generator=generator)


def perturb(graph: Graph, x0: torch.Tensor, sigma: torch.Tensor, prompt_mask: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x_t = graph.sample_transition(x0, sigma), except where prompt_mask (B, L) is True: x0 there. (B, L)"""
    x_t = graph.sample_transition(x0, sigma, generator=generator)
    return x_t if prompt_mask is None else torch.where(prompt_mask, x0, x_t)


def weighted_score_entropy(graph: Graph, log_score: torch.Tensor, sigma: torch.Tensor, dsigma: torch.Tensor,
                           x_t: torch.Tensor, x0: torch.Tensor,
                           prompt_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_i dsigma * SE_i over positions outside prompt_mask. log_score (B, L, V); sigma, dsigma (B,) -> (B,)"""
    se = graph.score_entropy(log_score, sigma, x_t, x0)  # (B, L) float32
    if prompt_mask is not None:
        se = torch.where(prompt_mask, torch.zeros_like(se), se)
    return dsigma.to(se.dtype) * se.sum(dim=-1)


def _check(x0: torch.Tensor, prompt_mask: Optional[torch.Tensor]) -> None:
    if x0.dim() != 2:
        raise ValueError(f"x0 must be (B, L) token ids, got shape {tuple(x0.shape)}")
    if prompt_mask is not None and prompt_mask.shape != x0.shape:
        raise ValueError(f"prompt_mask {tuple(prompt_mask.shape)} must match x0 {tuple(x0.shape)}")


def score_entropy_loss(score_fn: ScoreFn, graph: Graph, noise: Noise, x0: torch.Tensor,
                       t: Optional[torch.Tensor] = None, prompt_mask: Optional[torch.Tensor] = None,
                       eps: float = 1e-3, generator: Optional[torch.Generator] = None) -> ScoreEntropyLoss:
    """One noised batch of the SEDD training loss.

    x0 (B, L) clean ids; t (B,) or None for t ~ U(eps, 1); prompt_mask (B, L) bool, True on prompt positions (kept
    clean and not scored). Returns (batch mean, per-sequence values (B,)); upstream divides the mean by the
    gradient-accumulation count, which is the caller's business.
    """
    _check(x0, prompt_mask)
    if t is None:
        t = sample_times(x0.shape[0], eps, device=x0.device, generator=generator)
    sigma, dsigma = noise(t)  # (B,), (B,)
    x_t = perturb(graph, x0, sigma, prompt_mask, generator)
    log_score = score_fn(x_t, sigma)  # (B, L, V)
    per_seq = weighted_score_entropy(graph, log_score, sigma, dsigma, x_t, x0, prompt_mask)
    return ScoreEntropyLoss(loss=per_seq.mean(), per_sequence=per_seq)


def score_entropy_elbo(score_fn: ScoreFn, graph: Graph, noise: Noise, x0: torch.Tensor,
                       prompt_mask: Optional[torch.Tensor] = None, n_samples: int = 32, eps: float = 1e-3,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Monte Carlo negative ELBO (nats, an upper bound on -log p(response | prompt) up to the tiny terms below)
    per sequence, (B,) float32.

    -ELBO ~= integral_0^1 E_{x_t}[sum_{i scored} dsigma(t) SE_i] dt, estimated as (1 - eps) times the mean over
    `n_samples` draws of (t ~ U(eps, 1), x_t) per sequence; the interval [0, eps) and the prior term
    (KL of x_1 from the limit, about e^-sigma(1) per position) are left out. Prompt positions are clean and not
    scored, so this is the likelihood bound of the response given the prompt.

    Shared noise: the draws depend only on `generator` and the shapes, never on the model, so two models scored
    with two generators seeded alike (e.g. `torch.Generator().manual_seed(s)` each) see the same t and x_t. Gradients
    flow through score_fn unless the caller wraps this in torch.no_grad().
    """
    _check(x0, prompt_mask)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    total = torch.zeros(x0.shape[0], device=x0.device)
    for _ in range(n_samples):
        t = sample_times(x0.shape[0], eps, device=x0.device, generator=generator)
        sigma, dsigma = noise(t)
        x_t = perturb(graph, x0, sigma, prompt_mask, generator)
        total = total + weighted_score_entropy(graph, score_fn(x_t, sigma), sigma, dsigma, x_t, x0, prompt_mask)
    return (1.0 - eps) * total / n_samples
