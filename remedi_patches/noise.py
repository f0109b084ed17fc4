"""Remask SFT forward process (DESIGN.md 3.4): mask noise plus incorrect-token noise on the answer span.

For one sequence with diffusion time t ~ U(eps, 1) (or, in the block-diffusion layout, one t per answer block:
block_remask_noise, with p_mask the block's realised masked fraction):
  * every answer token is replaced by [MASK] with probability rho_mask(t) = t;
  * every answer token that stayed unmasked is replaced, with probability rho_incorrect(t) = 4 r t (1 - t),
    by a different token, so an "incorrect" token always differs from the truth. Its source
    (--incorrect_source): 'uniform' (default) draws it uniformly from the allowed vocabulary (all ids below
    `vocab_size` that are not special); 'tps' samples it from the backbone's own TPS distribution at that
    position with the truth and special ids excluded, i.e. the plausible mistakes the sampler makes; 'context'
    (the paper's) draws it from the tokens of the batch's x_t (every non-special token of the rows noised
    together, prompts included, counted with multiplicity) with the truth excluded;
  * prompt tokens are never touched.

Everything here is pure tensor maths: no model, no I/O (the 'tps' source takes the backbone as a logits
function). Pass a `torch.Generator` for reproducible draws.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional, Union

import torch

INCORRECT_SOURCES = ("uniform", "tps", "context")


def check_noise_settings(r_incorrect: float, incorrect_source: str, eps: float) -> None:
    """ValueError naming the flag (--r_incorrect, --incorrect_source, --eps) whose value no noise can use."""
    if not 0.0 <= r_incorrect <= 1.0:
        raise ValueError(f"--r_incorrect must be in [0, 1] (rho_incorrect peaks at r), got {r_incorrect}")
    if incorrect_source not in INCORRECT_SOURCES:
        raise ValueError(f"--incorrect_source must be one of {INCORRECT_SOURCES}, got {incorrect_source!r}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"--eps must be in [0, 1) (t ~ U(eps, 1)), got {eps}; the usual value is 1e-3")


class RemaskBatch(NamedTuple):
    noisy: torch.Tensor  # (B, L) long, x_t fed to the model
    t: torch.Tensor  # (B,) float, diffusion time per sequence, or (B, L) per position (one t per block)
    p_mask: torch.Tensor  # (B, L) float, rho_mask(t) per position, or the block's realised masked fraction
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
    t: None draws t ~ U(eps, 1) per sequence; a float or a (B,) tensor fixes it per sequence, a (B, L) tensor per
    position (block_remask_noise).
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
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        t = t.clone() if t.dim() == 2 else t.expand(b).clone()
    answer_mask = answer_mask.bool()
    t_pos = t if t.dim() == 2 else t[:, None].expand(b, l)  # (B, L)

    p_mask = rho_mask(t_pos)
    masked = answer_mask & (torch.rand(b, l, generator=generator, device=device) < p_mask)

    p_inc = rho_incorrect(t_pos, r_incorrect)  # (B, L)
    incorrect = answer_mask & ~masked & (torch.rand(b, l, generator=generator, device=device) < p_inc)

    allowed = allowed_token_ids(vocab_size, list(special_ids) + [mask_id], device=device)
    wrong = random_other_tokens(input_ids, allowed, generator=generator)  # (B, L)
    noisy = torch.where(incorrect, wrong, input_ids)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), noisy)
    return RemaskBatch(noisy=noisy, t=t, p_mask=p_mask, masked=masked, incorrect=incorrect)


def block_times(block_index: torch.Tensor, eps: float = 1e-3,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One t ~ U(eps, 1) per answer block: block_index (B, L) (-1 off the answer) -> t per position (B, L). The
    draws are (B, number of blocks) in row-major order, so a batch's noise does not depend on how it is split."""
    b = block_index.shape[0]
    n_blocks = max(int(block_index.max()) + 1, 1)
    t = sample_t(b * n_blocks, eps, generator=generator, device=block_index.device).view(b, n_blocks)
    return t.gather(1, block_index.clamp(min=0))


def realised_p_mask(masked: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
    """(B, L) the masked fraction of each position's answer block (the paper's p_mask of the block-diffusion
    layout), at least 1 / block size: exact at every masked position, the only ones the TPS loss reads."""
    b, l = masked.shape
    n_blocks = max(int(block_index.max()) + 1, 1)
    slot = block_index.clamp(min=0)
    on = (block_index >= 0).float()
    size = torch.zeros(b, n_blocks, device=masked.device).scatter_add_(1, slot, on)
    hits = torch.zeros(b, n_blocks, device=masked.device).scatter_add_(1, slot, on * masked.float())
    fraction = hits / size.clamp(min=1)
    return torch.maximum(fraction, 1.0 / size.clamp(min=1)).gather(1, slot)


def block_remask_noise(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    block_index: torch.Tensor,
    mask_id: int,
    r_incorrect: float,
    vocab_size: int,
    special_ids: Iterable[int],
    generator: Optional[torch.Generator] = None,
    eps: float = 1e-3,
    t: Union[torch.Tensor, float, None] = None,
) -> RemaskBatch:
    """apply_remask_noise with one t ~ U(eps, 1) per answer block (block_index (B, L), see block_times; `t` fixes
    it instead) and p_mask the block's realised masked fraction (realised_p_mask), as the paper's block-diffusion
    Remask SFT draws it."""
    t = block_times(block_index, eps, generator) if t is None else t
    batch = apply_remask_noise(input_ids, answer_mask, mask_id, r_incorrect, vocab_size, special_ids, t=t,
                               generator=generator, eps=eps)
    return batch._replace(p_mask=realised_p_mask(batch.masked, block_index))


def remask_noise(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    block_index: torch.Tensor,
    layout: str,
    mask_id: int,
    r_incorrect: float,
    vocab_size: int,
    special_ids: Iterable[int],
    generator: Optional[torch.Generator] = None,
    eps: float = 1e-3,
    context: bool = False,
    t: Union[torch.Tensor, float, None] = None,
) -> RemaskBatch:
    """The Remask SFT noise of a batch of rows (remedi_patches.block_layout.RemaskRows fields): one t per row
    ('sequence', apply_remask_noise) or per answer block ('block_diffusion', block_remask_noise); `t` fixes it;
    incorrect tokens then drawn from the batch's own x_t when `context` (context_incorrect_noise)."""
    special_ids = list(special_ids)
    if layout == "block_diffusion":
        batch = block_remask_noise(input_ids, answer_mask, block_index, mask_id, r_incorrect, vocab_size, special_ids,
                                   generator, eps, t)
    else:
        batch = apply_remask_noise(input_ids, answer_mask, mask_id, r_incorrect, vocab_size, special_ids, t=t,
                                   generator=generator, eps=eps)
    if context:  # the pool is the whole batch's x_t
        batch = context_incorrect_noise(input_ids, batch, mask_id, vocab_size, special_ids, generator)
    return batch


def sample_replacements(
    logits: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor,
    vocab_size: int,
    special_ids: Iterable[int],
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """`targets` with, at every `positions` entry, a token sampled from softmax(logits) (temperature 1) over the
    ids below `vocab_size` that are neither special nor the target there. (B, L) long on logits' device.

    logits (B, L, V) (any dtype / device); targets (B, L) long; positions (B, L) bool. A row whose restricted
    distribution is degenerate (no mass, NaN / inf logits) falls back to uniform over the same ids. Exactly one
    uniform per position is drawn (inverse CDF, row-major order), so splitting a batch into chunks that share
    one generator gives the same tokens.
    """
    device = logits.device
    targets, positions = targets.to(device), positions.to(device).bool()
    rows = logits[positions].float()  # (N, V)
    truth = targets[positions]  # (N,)
    v = rows.shape[-1]
    ok = torch.arange(v, device=device) < vocab_size  # (V,)
    special = [i for i in set(int(s) for s in special_ids) if 0 <= i < v]
    if special:
        ok[torch.tensor(special, device=device)] = False
    ok = ok.expand_as(rows).clone()  # (N, V)
    ok[torch.arange(len(truth), device=device), truth.clamp(max=v - 1)] &= truth >= v  # never the truth
    if not ok.any(-1).all():
        raise ValueError(f"no token below vocab_size={vocab_size} is left to sample once the special ids and the "
                         "truth are excluded; pass the tokenizer's real vocabulary size")
    weight = (rows - rows.max(-1, keepdim=True).values).exp().masked_fill(~ok, 0.0)  # (N, V) unnormalised
    total = weight.sum(-1)
    degenerate = ~(torch.isfinite(total) & (total > 0))
    weight = torch.where(degenerate[:, None], ok.float(), weight)
    cdf = weight.cumsum(-1)  # (N, V)
    u = torch.rand(len(truth), generator=generator, device=generator.device if generator else device).to(device)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)  # first id with cdf > u*total
    last = v - 1 - (weight.flip(-1) > 0).int().argmax(-1)  # last id with mass (u*total may round up to total)
    out = targets.clone()
    out[positions] = torch.minimum(idx, last)
    return out


def tps_incorrect_noise(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    batch: RemaskBatch,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    generator: Optional[torch.Generator] = None,
) -> RemaskBatch:
    """--incorrect_source tps: `batch` (from apply_remask_noise, same t and sets) with its incorrect tokens
    resampled from the backbone. logits_fn(x (B, L)) -> logits (B, L, V) runs once, without grad, on the clean
    input with the masked AND the to-be-corrupted positions set to [MASK]; mask_id is always excluded."""
    proposal_input = torch.where(batch.masked | batch.incorrect, torch.full_like(input_ids, mask_id), input_ids)
    with torch.no_grad():
        logits = logits_fn(proposal_input)  # (B, L, V)
    tokens = sample_replacements(logits, input_ids, batch.incorrect, vocab_size, list(special_ids) + [mask_id],
                                 generator).to(input_ids.device)
    return batch._replace(noisy=torch.where(batch.incorrect, tokens, batch.noisy))


def context_incorrect_noise(
    input_ids: torch.Tensor,
    batch: RemaskBatch,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    generator: Optional[torch.Generator] = None,
) -> RemaskBatch:
    """--incorrect_source context: `batch` (from apply_remask_noise, same t and sets) with every incorrect token
    drawn from the pool of tokens present in the batch's x_t, the truth at that position excluded.

    The pool is the multiset of non-special tokens of x_t over all rows (prompts and unmasked answer tokens before
    incorrect noise; mask, EOS padding and other special ids never enter it, unlike the official code, whose pool
    holds the EOS padding). A draw is uniform over the pool entries that differ from the truth: with the pool
    sorted, the truth's entries form one run [lo, hi), and k ~ U{0 .. N - (hi - lo) - 1} maps to k (k < lo) or
    k + hi - lo. One uniform per position is drawn (row-major), so the draws are reproducible with `generator`.
    A position whose truth is the only token in the pool falls back to a uniform draw over the allowed vocabulary.
    """
    special = torch.tensor(sorted(set(special_ids) | {mask_id}), device=input_ids.device)
    x_t = torch.where(batch.masked, torch.full_like(input_ids, mask_id), input_ids)  # (B, L) before incorrect noise
    pool = x_t[~torch.isin(x_t, special)].sort().values  # (N,) with multiplicity
    lo = torch.searchsorted(pool, input_ids)  # (B, L) the truth's run in the pool
    hi = torch.searchsorted(pool, input_ids, right=True)
    others = pool.numel() - (hi - lo)  # (B, L) pool entries that differ from the truth
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    k = (u * others).long().clamp(max=(others - 1).clamp(min=0))
    drawn = pool[torch.where(k < lo, k, k + hi - lo).clamp(max=max(pool.numel() - 1, 0))] if pool.numel() else k
    allowed = allowed_token_ids(vocab_size, special.tolist(), device=input_ids.device)
    fallback = random_other_tokens(input_ids, allowed, generator=generator)
    tokens = torch.where(others > 0, drawn, fallback)
    return batch._replace(noisy=torch.where(batch.incorrect, tokens, batch.noisy))


def noise_special_ids(tokenizer, mask_id: int, eos_id: Optional[int], eot_id: Optional[int]) -> list[int]:
    """Ids never drawn as incorrect tokens: mask, EOS/EoT, and every special token of the tokenizer."""
    ids = set(tokenizer.all_special_ids) | {mask_id}
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    ids |= {i for i in (eos_id, eot_id, tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None}
    return sorted(ids)
