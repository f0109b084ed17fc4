"""Selection maths of the sampler: the commit schedule k_i and keep-top-k_i / re-mask-the-rest.

Every block of B answer positions starts fully masked and is denoised in S steps. Step i commits
n_i tokens, the block's B masks split evenly over the S steps with the remainder going to the
earliest steps. Upstream LLaDA keeps what it committed and adds the n_i most confident masked
positions; RemeDi keeps the top k_i = n_1 + ... + n_i positions of the whole block and sets
every other block position back to [MASK]. Either way the block holds exactly B - k_i masks
after step i (DESIGN.md 3.2).

Ranking by the UPS may also be sampled (`plackett_luce_keys`): the RL sampler of RemeDi draws the k_i kept
positions from softmax(confidences / tau) without replacement, in Plackett-Luce order.

Parallel decoding (Fast-dLLM, DESIGN.md 12) replaces the fixed schedule by a count per row and step
(`parallel_counts`): `threshold` counts the confident positions, `factor` the longest prefix of the sorted
confidences whose n-th value reaches 1 - factor / (n + 1). Without re-masking that many masked positions are
committed (at least one). With re-masking the count runs over the whole block, committed tokens included, and the
block keeps k = max(count, held + 1) positions (held = tokens it holds before the step): the top-k by confidence,
so a committed token whose confidence fell below newer candidates' is re-masked exactly as under the fixed k_i, and
every step adds at least one token (a block of N takes at most N steps).

All functions here are pure tensor functions; `Trajectory` is the optional per-step record.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


def commit_counts(block_length: int, steps: int) -> list[int]:
    """n_1..n_S: tokens committed per step, the earliest steps taking the remainder."""
    base, remainder = divmod(block_length, steps)
    return [base + (i < remainder) for i in range(steps)]


def commit_schedule(block_length: int, steps: int) -> list[int]:
    """k_1..k_S: the cumulative commit counts; k_S == block_length."""
    k, schedule = 0, []
    for n in commit_counts(block_length, steps):
        k += n
        schedule.append(k)
    return schedule


def rank_last(confidence: torch.Tensor, gated: torch.Tensor) -> torch.Tensor:
    """Move the `gated` positions below every other finite confidence of their row.

    confidence: (B, N) float; +-inf entries (positions that can never / must always win) stay as they are.
    gated:      (B, N) bool.
    The gated values are shifted down by (max - min + 1) of the row's finite values, so they keep
    their relative order, rank after every finite ungated value, and stay finite: a top-k that
    has to reach into them never spills into -inf positions.
    """
    confidence = confidence.to(torch.promote_types(confidence.dtype, torch.float32))
    finite = confidence.isfinite()
    hi = confidence.masked_fill(~finite, -torch.inf).amax(dim=-1, keepdim=True)  # (B, 1)
    lo = confidence.masked_fill(~finite, torch.inf).amin(dim=-1, keepdim=True)  # (B, 1)
    return torch.where(gated & finite, confidence - (hi - lo + 1), confidence)


def top_k_mask(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """(B, M) scores -> (B, M) bool, True at the k largest values of each row.

    k: one int for every row (one batched torch.topk, which breaks ties as upstream's per-row top-k), or a (B,)
    tensor of per-row counts (parallel decoding; ties broken by a stable descending sort unless every row has the
    same count, which takes the int path so ties fall as under the fixed schedule).
    """
    if not isinstance(k, int) and bool((k == k[0]).all()):
        k = int(k[0])  # one count for every row: break ties as the fixed schedule does
    if isinstance(k, int):
        index = scores.topk(k, dim=-1).indices  # (B, k)
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)
    order = scores.sort(dim=-1, descending=True, stable=True).indices  # (B, M)
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    chosen = ranks < k.to(scores.device)[:, None]  # (B, M) True at the first k ranks
    return torch.zeros_like(chosen).scatter_(-1, order, chosen)


def keep_top_k(confidence: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """RemeDi rule: (B, N) confidence -> (B, N) bool, True at the k largest values of each row.

    Under the fixed schedule k is the same for every row: each block starts fully masked in every row, so one
    batched top-k replaces upstream's per-row loop. Parallel decoding gives a (B,) tensor (`parallel_counts`).
    """
    return top_k_mask(confidence, k)


def parallel_counts(confidence: torch.Tensor, eligible: torch.Tensor, threshold: Optional[float] = None,
                    factor: Optional[float] = None) -> torch.Tensor:
    """How many `eligible` positions a parallel-decoding rule accepts: (B, N) confidence, (B, N) bool -> (B,) long.

    threshold: the eligible positions with confidence >= threshold (in the confidence source's own scale).
    factor: sort the eligible confidences descending; the n-th (1-based) needs confidence >= 1 - factor / (n + 1);
        the count is the longest prefix that passes (Fast-dLLM's rule, whose eq. bound makes greedy parallel
        decoding equal greedy sequential decoding; unlike its code, a last position that fails is not taken).
    Exactly one of the two is given. The floor of one token per step is the caller's (the step rule).
    """
    if (threshold is None) == (factor is None):
        raise ValueError("give exactly one of threshold and factor")
    if threshold is not None:
        return (eligible & (confidence >= threshold)).sum(dim=-1)
    ranked = confidence.masked_fill(~eligible, -torch.inf).sort(dim=-1, descending=True).values  # (B, N)
    n = torch.arange(1, ranked.shape[-1] + 1, device=ranked.device)
    passes = ranked >= 1 - factor / (n + 1)  # (B, N); -inf (not eligible) never passes
    return passes.long().cumprod(dim=-1).sum(dim=-1)


def plackett_luce_keys(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Random keys whose descending order is a Plackett-Luce sample from softmax(scores / temperature).

    scores: (B, N) float (-inf = never drawn); temperature > 0. Returns (B, N) float64 keys
    scores / temperature + Gumbel noise (the Gumbel-top-k trick): the top-k of the keys is distributed as
    torch.multinomial(softmax(scores / temperature), k, replacement=False), in the same order, and the top-k of
    any subset of positions as the same draw restricted to that subset. Unlike multinomial it never fails when
    probabilities underflow to 0. One (B, N) float64 torch.rand draw from the global RNG.
    """
    if temperature <= 0:
        raise ValueError(f"a Plackett-Luce temperature must be > 0, got {temperature}; use greedy top-k for 0")
    u = torch.rand(scores.shape, dtype=torch.float64, device=scores.device)
    gumbel = -(-u.clamp_min(torch.finfo(torch.float64).tiny).log()).log()
    return scores.double() / temperature + gumbel


def commit_top_n(confidence: torch.Tensor, masked: torch.Tensor, n: int | torch.Tensor, seq_len: int,
                 start: int) -> torch.Tensor:
    """Upstream rule: (B, N) bool, True at the n most confident masked positions of the block (n: int, or (B,)).

    The top-n runs on the (B, seq_len) row upstream ranks: the masked positions' confidences at
    their sequence positions start + j, -inf everywhere else. Equal confidences (frequent in
    bf16) are thus broken exactly as upstream breaks them.
    """
    b, width = confidence.shape
    row = confidence.new_full((b, seq_len), -torch.inf)  # (B, L)
    row[:, start:start + width] = confidence.masked_fill(~masked, -torch.inf)
    return top_k_mask(row, n)[:, start:start + width]


def remask_block(block: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor,
                 mask_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the candidates at the kept positions of the block and mask all the others.

    block:      (B, N) current tokens of the block (mask_id where masked)
    candidates: (B, N) token per position: the sampled token where masked, else the current one
    keep:       (B, N) bool, from keep_top_k (RemeDi) or ~masked | commit_top_n (upstream)
    Returns (new_block (B, N), committed (B, N) bool: was masked and now holds a token,
             remasked (B, N) bool: held a token and is masked again).
    """
    masked = block == mask_id
    new_block = torch.where(keep, candidates, torch.full_like(block, mask_id))
    return new_block, keep & masked, ~keep & ~masked


@dataclass
class StepRecord:
    block: int                      # block index
    step: int                       # step within the block (0-based)
    start: int                      # absolute position of the block's first token
    committed: torch.Tensor         # (B, block_length) bool: masked before, token now
    remasked: torch.Tensor          # (B, block_length) bool: token before, masked now
    mask_count: torch.Tensor        # (B,) masks left in the block after the step
    tokens: Optional[torch.Tensor]  # (B, L) whole sequence after the step, when keep_tokens


@dataclass
class Trajectory:
    """Pass one as `generate(..., trajectory=Trajectory())` to record every denoising step and the calls' cost.

    The samplers add to the counters at every call, so one Trajectory may sum a whole evaluation:
    `nfe` (forwards per call) and `tokens_per_second` (answer positions filled per wall-clock second).
    record_steps=False keeps only the counters (no per-step copies: what the evaluators use)."""

    keep_tokens: bool = False
    record_steps: bool = True
    steps: list[StepRecord] = field(default_factory=list)
    forwards: int = 0     # model forwards run (NFE), counted by the samplers
    calls: int = 0        # sampler calls
    tokens: int = 0       # answer positions filled: batch * gen_length per call
    seconds: float = 0.0  # wall-clock seconds of the sampler calls
    # called at every step, before the keep / re-mask, with (tokens (B, N) of the block, candidates (B, N), TPS
    # logits (B, N, V), UPS logits (B, N) or None, confidence (B, N) the ranking used, k_i): what RL rollouts
    # record (remedi_patches.rl.rollout.PolicyRecorder)
    observer: Optional[Callable[..., None]] = None

    def record(self, block: int, step: int, start: int, committed: torch.Tensor, remasked: torch.Tensor,
               mask_count: torch.Tensor, tokens: torch.Tensor) -> None:
        if not self.record_steps:
            return
        self.steps.append(StepRecord(
            block=block, step=step, start=start, committed=committed.cpu(), remasked=remasked.cpu(),
            mask_count=mask_count.cpu(), tokens=tokens.cpu().clone() if self.keep_tokens else None,
        ))

    def add_call(self, answer: torch.Tensor, forwards: int, start: float) -> None:
        """Count one sampler call: answer (B, gen_length) it filled, its forwards, its time.perf_counter() start
        (read after the device finished: CUDA work is asynchronous)."""
        if answer.is_cuda:
            torch.cuda.synchronize(answer.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.forwards += forwards
        self.tokens += answer.numel()

    @property
    def nfe(self) -> float:
        """Model forwards per sampler call."""
        return self.forwards / self.calls if self.calls else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def cost(self) -> str:
        """'NFE 18, 412.3 tokens/s' (per call, averaged over the calls recorded)."""
        return f"NFE {self.nfe:g}, {self.tokens_per_second:.1f} tokens/s"
