"""Remask SFT losses (DESIGN.md 3.4): TPS cross-entropy, UPS labels and UPS binary cross-entropy.

Pure functions of tensors. Shapes: B sequences, L positions, V vocabulary entries.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class RemaskLosses(NamedTuple):
    total: torch.Tensor  # scalar, tps + lambda_ups * ups
    tps: torch.Tensor  # scalar
    ups: torch.Tensor  # scalar
    labels: torch.Tensor  # (B, L) float UPS targets


def tps_loss(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor, answer_len: torch.Tensor
) -> torch.Tensor:
    """Token Prediction Stream loss, LLaDA SFT form.

    logits (B, L, V); targets (B, L) clean ids; masked (B, L) bool; p_mask (B, L); answer_len (B,) answer tokens
    per sequence, EOS padding included. Each masked token contributes CE / p_mask / answer_len of its sequence;
    the sum is divided by B:  sum_{b, i masked} CE_bi / (p_mask_bi * answer_len_b) / B.
    """
    b, l = targets.shape
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")  # (M,)
    length = answer_len.to(ce.dtype)[:, None].expand(b, l)[masked]  # (M,)
    return (ce / p_mask[masked].to(ce.dtype) / length).sum() / b


@torch.no_grad()
def true_token_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Stop-gradient TPS probability of the true token, p_theta(x0_i | x_t). (B, L, V) -> (B, L) float32."""
    logits = logits.detach().float()
    return (logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)).exp()


def ups_labels(
    logits: torch.Tensor, targets: torch.Tensor, noisy: torch.Tensor, masked: torch.Tensor, incorrect: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """UPS targets per position (B, L) float, no gradient, smoothed by eps = label_smoothing (the paper's 0.05):
    clean unmasked token -> 1 - eps; incorrect token -> eps; masked position -> eps + (1 - 2 eps) p_theta(true
    token | x_t), detached. eps = 0 gives 1 / 0 / p_theta. Positions outside the answer get labels too (the
    untouched prompt's); ups_loss ignores them.

    `noisy` is checked against the flags: an incorrect position must hold a token that differs from the target,
    any other unmasked position must hold the target.
    """
    unmasked = ~masked
    if bool(((noisy == targets) != ~incorrect)[unmasked].any()):
        raise ValueError(
            "noisy tokens disagree with the incorrect flags (an 'incorrect' token equals the truth or a clean one "
            "differs): build masked/incorrect with remedi_patches.noise.apply_remask_noise on the same input_ids"
        )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (labels eps and 1 - eps), got {label_smoothing}")
    clean = (~incorrect).float()
    labels = torch.where(masked, true_token_prob(logits, targets), clean)  # (B, L) in [0, 1]
    return label_smoothing + (1.0 - 2.0 * label_smoothing) * labels


def ups_loss(ups_logits: torch.Tensor, labels: torch.Tensor, answer_mask: torch.Tensor,
             n_scored: Optional[float] = None) -> torch.Tensor:
    """Unmasking Policy Stream loss: BCE-with-logits over ALL answer positions (masked, clean and incorrect).

    ups_logits (B, L) UPS logit h; labels (B, L) in [0, 1]; answer_mask (B, L) bool.
    Normalisation: the per-position BCE is summed over every answer position of the batch and divided by the
    total number of answer positions in the batch (a token-level mean; each answer token weighs the same), or by
    `n_scored`: a micro-batch of a larger batch passes that batch's count / its number of micro-batches, so the
    mean over micro-batches (gradient accumulation, DDP) is the large batch's token mean exactly.
    """
    bce = F.binary_cross_entropy_with_logits(ups_logits.float(), labels.float(), reduction="none")  # (B, L)
    n = answer_mask.sum().clamp(min=1) if n_scored is None else n_scored
    return (bce * answer_mask).sum() / n


def remask_losses(
    logits: torch.Tensor,
    ups_logits: torch.Tensor,
    targets: torch.Tensor,
    noisy: torch.Tensor,
    masked: torch.Tensor,
    incorrect: torch.Tensor,
    p_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    answer_len: torch.Tensor,
    lambda_ups: float,
    label_smoothing: float = 0.0,
    ups_normaliser: Optional[float] = None,
) -> RemaskLosses:
    """TPS loss, UPS labels (smoothed by label_smoothing), UPS loss (ups_normaliser: see ups_loss's n_scored) and
    total = tps + lambda_ups * ups for one noised batch."""
    labels = ups_labels(logits, targets, noisy, masked, incorrect, label_smoothing)
    tps = tps_loss(logits, targets, masked, p_mask, answer_len)
    ups = ups_loss(ups_logits, labels, answer_mask, ups_normaliser)
    return RemaskLosses(total=tps + lambda_ups * ups, tps=tps, ups=ups, labels=labels)
