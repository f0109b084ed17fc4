"""Masked-diffusion training objective (SMDM / LLaDA), as small pure functions.

Forward process: per sequence t ~ U(0, 1), p_mask = (1 - eps) t + eps, every (maskable) token
replaced by [MASK] independently with probability p_mask. Pretraining loss: cross-entropy on
masked tokens divided by p_mask, summed and normalised by b * l. (Diffusion SFT uses the same
forward process with the prompt not maskable, and the LLaDA SFT loss normalised by answer
length, `remedi_patches.losses.tps_loss`.)

Randomness comes in as tensors (`NoiseDraw`) made from an explicit generator, so the same
(seed, step) gives the same noise whatever the device layout, and the maths stays testable.
"""
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F


class NoiseDraw(NamedTuple):
    t: torch.Tensor  # (b,) diffusion time in [0, 1)
    u: torch.Tensor  # (b, l) uniforms; token masked where u < p_mask
    length: int      # sequence length to train on (shorter than l for a random-length crop)


def seeded_generator(seed: int, *stream: int) -> torch.Generator:
    """CPU generator seeded from (seed, *stream) (e.g. (seed, STREAM_TRAIN, step)), well mixed."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_noise(generator: torch.Generator, b: int, l: int, random_length_prob: float = 0.0) -> NoiseDraw:
    """Uniform draws for a (b, l) batch. With probability `random_length_prob` the batch is cropped
    to a length drawn uniformly from [1, l] (LLaDA / SMDM train 1% of data at random lengths)."""
    t = torch.rand(b, generator=generator)
    u = torch.rand(b, l, generator=generator)
    crop = torch.rand((), generator=generator).item() < random_length_prob
    length = int(torch.randint(1, l + 1, (), generator=generator)) if crop else l
    return NoiseDraw(t, u, length)


def forward_process(input_ids: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int, eps: float = 1e-3,
                    maskable: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask tokens: input_ids (b, l), t (b,), u (b, l) -> noisy (b, l), masked (b, l) bool, p_mask (b, l).

    `maskable` (b, l) bool restricts masking (SFT: False on the prompt, which stays clean).
    """
    p_mask = ((1 - eps) * t.to(input_ids.device, torch.float32))[:, None].expand_as(input_ids) + eps
    masked = u.to(input_ids.device) < p_mask
    if maskable is not None:
        masked = masked & maskable
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p_mask


def mdm_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """Pretraining loss: sum over masked tokens of CE(logits, targets) / p_mask, divided by b * l.
    logits (b, l, V), targets (b, l), masked (b, l) bool, p_mask (b, l)."""
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")  # (M,)
    return (ce / p_mask[masked]).sum() / targets.numel()
