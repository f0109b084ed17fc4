"""Remask SFT forward process (DESIGN.md 3.4): mask noise plus incorrect-token noise on the answer span.

For one sequence with diffusion time t ~ U(eps, 1):
  * every answer token is replaced by [MASK] with probability rho_mask(t) = t;
  * every answer token that stayed unmasked is replaced, with probability rho_incorrect(t) = 4 r t (1 - t),
    by a token drawn uniformly from the allowed vocabulary (all ids below `vocab_size` that are not special)
    minus the token that was there, so an "incorrect" token always differs from the truth;
  * prompt tokens are never touched.

Everything here is pure tensor maths: no model, no I/O. Pass a `torch.Generator` for reproducible draws.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Union

import torch


class RemaskBatch(NamedTuple):
    noisy: torch.Tensor  # (B, L) long, x_t fed to the model
    t: torch.Tensor  # (B,) float, diffusion time per sequence
    p_mask: torch.Tensor  # (B, L) float, rho_mask(t) broadcast over positions
    masked: torch.Tensor  # (B, L) bool, answer positions set to [MASK]
    incorrect: torch.Tensor  # (B, L) bool, answer positions holding a wrong (non-mask) token


def sample_t(
    b: int,
    eps: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """t ~ U(eps, 1) for each of `b` sequences, shape (b,), float32."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}; the usual value is 1e-3")
    u = torch.rand(b, generator=generator, device=device)
    return (1.0 - eps) * u + eps


def rho_mask(t: torch.Tensor) -> torch.Tensor:
    """Probability that an answer token is masked at time t: rho_mask(t) = t."""
    return t


def rho_incorrect(t: torch.Tensor, r: float) -> torch.Tensor:
    """Probability that an unmasked answer token is replaced by a wrong one: 4 r t (1 - t) (peak r at t = 0.5)."""
    return 4.0 * r * t * (1.0 - t)


def allowed_token_ids(vocab_size: int, special_ids: Iterable[int], device=None) -> torch.Tensor:
    """Sorted ids in [0, vocab_size) that are not special: the pool incorrect tokens are drawn from. (V',)"""
    keep = torch.ones(vocab_size, dtype=torch.bool, device=device)
    special = [i for i in set(int(s) for s in special_ids) if 0 <= i < vocab_size]
    if special:
        keep[torch.tensor(special, device=device)] = False
    allowed = keep.nonzero().squeeze(1)
    if allowed.numel() < 2:
        raise ValueError(
            f"only {allowed.numel()} non-special ids below vocab_size={vocab_size}: incorrect-token noise needs at "
            "least 2; pass the tokenizer's real vocabulary size"
        )
    return allowed


def random_other_tokens(
    tokens: torch.Tensor, allowed: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """For every entry of `tokens`, a token drawn uniformly from `allowed` (sorted) minus the entry itself.

    A token inside the allowed set at index j gets allowed[(j + k) mod V'] with k uniform in 1..V'-1, which is
    uniform over the other V'-1 ids and never equal to the token. A token outside the set (e.g. an EOS pad)
    gets any allowed id, uniform over all V'.
    """
    n = allowed.numel()
    j = torch.searchsorted(allowed, tokens.clamp(min=0)).clamp(max=n - 1)  # index of the token if it is allowed
    inside = allowed[j] == tokens
    k = torch.randint(1, n, tokens.shape, generator=generator, device=tokens.device)  # offset in 1..V'-1
    anywhere = torch.randint(0, n, tokens.shape, generator=generator, device=tokens.device)
    idx = torch.where(inside, (j + k) % n, anywhere)
    return allowed[idx]


def apply_remask_noise(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    mask_id: int,
    r_incorrect: float,
    vocab_size: int,
    special_ids: Iterable[int],
    t: Union[torch.Tensor, float, None] = None,
    generator: Optional[torch.Generator] = None,
    eps: float = 1e-3,
) -> RemaskBatch:
    """Corrupt the answer span of clean sequences with mask and incorrect-token noise.

    input_ids (B, L) long clean tokens; answer_mask (B, L) bool, True on answer positions (EOS padding included).
    t: None draws t ~ U(eps, 1) per sequence; a float or a (B,) tensor fixes it.
    special_ids: ids never used as incorrect tokens (mask, EOS/pad, BOS, EoT, ...); mask_id is always added.
    """
    if input_ids.shape != answer_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and answer_mask {tuple(answer_mask.shape)} differ")
    if not 0.0 <= r_incorrect <= 1.0:
        raise ValueError(f"r_incorrect must be in [0, 1] so that 4 r t (1 - t) is a probability, got {r_incorrect}")
    b, l = input_ids.shape
    device = input_ids.device
    if t is None:
        t = sample_t(b, eps, generator=generator, device=device)
    else:
        t = torch.as_tensor(t, dtype=torch.float32, device=device).expand(b).clone()
    answer_mask = answer_mask.bool()

    p_mask = rho_mask(t)[:, None].expand(b, l)  # (B, L)
    masked = answer_mask & (torch.rand(b, l, generator=generator, device=device) < p_mask)

    p_inc = rho_incorrect(t, r_incorrect)[:, None]  # (B, 1)
    incorrect = answer_mask & ~masked & (torch.rand(b, l, generator=generator, device=device) < p_inc)

    allowed = allowed_token_ids(vocab_size, list(special_ids) + [mask_id], device=device)
    wrong = random_other_tokens(input_ids, allowed, generator=generator)  # (B, L)
    noisy = torch.where(incorrect, wrong, input_ids)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), noisy)
    return RemaskBatch(noisy=noisy, t=t, p_mask=p_mask, masked=masked, incorrect=incorrect)
