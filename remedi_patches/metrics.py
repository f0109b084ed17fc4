"""Metrics: incorrect-token detection of the UPS (ROC AUC, ROC curve, confusion matrix) and token-level accuracy
of a sampled answer on the reference answer span (token_accuracy, answer_token_accuracy).

Detection convention: the positive class is an incorrect token; the score of a token is 1 - sigmoid(h), h its UPS logit
(a UPS that trusts a token little calls it likely incorrect). Only unmasked answer tokens are scored. The baseline
the sampler's `tps_prob` source stands for scores a token 1 - p_TPS(token there | x_t) (token_prob_scores).
The held-out measurement that uses these is remedi_patches.detection.measure_detection.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch


class Confusion(NamedTuple):
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")


def _flat(scores, labels) -> Tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(scores).flatten().cpu()  # kept in its own dtype: thresholds compare like the caller's
    if not s.is_floating_point():
        s = s.double()
    y = torch.as_tensor(labels).flatten().cpu().bool()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.numel()}) and labels ({y.numel()}) must have the same number of entries")
    return s, y


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks (float64)."""
    order = torch.argsort(x, stable=True)
    xs = x[order]
    _, counts = torch.unique_consecutive(xs, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # last 1-based rank of each tie group
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties counted as one half.

    Returns nan when only one class is present (the AUC is undefined then).
    """
    s, y = _flat(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(s)
    u = r[y].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def roc_curve(scores, labels) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fpr, tpr, thresholds), one point per distinct score, thresholds falling, starting at (0, 0) with +inf.

    At threshold c a token is called incorrect when its score >= c.
    """
    s, y = _flat(scores, labels)
    n_pos = max(int(y.sum()), 1)
    n_neg = max(y.numel() - int(y.sum()), 1)
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    thresholds, counts = torch.unique_consecutive(s, return_counts=True)
    last = counts.cumsum(0) - 1  # index of the last token at or above each threshold
    tps = y.to(torch.float64).cumsum(0)[last]
    fps = (last + 1).to(torch.float64) - tps
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, fps / n_neg])
    tpr = torch.cat([zero, tps / n_pos])
    return fpr, tpr, torch.cat([torch.tensor([float("inf")], dtype=torch.float64), thresholds.double()])


def confusion_at(scores, labels, threshold: float = 0.5) -> Confusion:
    """Confusion counts when every token with score >= threshold is called incorrect."""
    s, y = _flat(scores, labels)
    pred = s >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    return Confusion(tp=tp, fp=fp, tn=y.numel() - tp - fp - fn, fn=fn)


def detection_scores(
    ups_logits: torch.Tensor, incorrect: torch.Tensor, masked: torch.Tensor, answer_mask: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores 1 - sigmoid(h) and labels (incorrect) of the unmasked answer tokens, flattened. (N,), (N,) bool."""
    keep = answer_mask.bool() & ~masked.bool()
    return (1.0 - torch.sigmoid(ups_logits.detach().float()))[keep].cpu(), incorrect.bool()[keep].cpu()


@torch.no_grad()
def token_prob_scores(
    logits: torch.Tensor, noisy: torch.Tensor, masked: torch.Tensor, answer_mask: torch.Tensor
) -> torch.Tensor:
    """Baseline scores 1 - p_TPS(token there | x_t) of the unmasked answer tokens, flattened in the order of
    detection_scores. logits (B, L, V); noisy (B, L) the tokens fed to the model. (N,) float32 on the CPU."""
    keep = answer_mask.bool() & ~masked.bool()
    there = noisy.clamp(max=logits.shape[-1] - 1)  # the mask id may lie past the logits; masks are not scored
    lf = logits.detach().float()
    p_there = (lf.gather(-1, there.unsqueeze(-1)).squeeze(-1) - lf.logsumexp(-1)).exp()  # (B, L)
    return (1.0 - p_there)[keep].cpu()


def token_accuracy(generated: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of the reference's positions that `generated` holds the same token at, compared position by
    position from the start: matches / len(reference). Positions past the end of `generated` count wrong;
    generated tokens past the end of the reference are not scored. nan for an empty reference."""
    if not reference:
        return float("nan")
    return sum(g == r for g, r in zip(generated, reference)) / len(reference)


def answer_span(answer: Sequence[int], stop_ids: Sequence[int], eos_id: int) -> list[int]:
    """The answer span a sampled answer is scored on: its tokens up to its first stop token (EOS / EoT), that stop
    written as `eos_id`; an answer with no stop token is kept whole (it never ended)."""
    answer = list(answer)
    end = next((j for j, t in enumerate(answer) if t in stop_ids), None)
    return answer if end is None else answer[:end] + [eos_id]


def answer_token_accuracy(answer: Sequence[int], reference: Sequence[int], stop_ids: Sequence[int],
                          eos_id: int) -> float:
    """Token-level accuracy of a sampled answer on the answer span, the evaluators' `token_accuracy`:
    token_accuracy(answer_span(answer), reference + [EOS]). `answer`: the sampled answer positions (gen_length ids);
    `reference`: the reference answer's ids by the same tokenizer without special tokens (as SFT tokenises the
    answer, which it follows by EOS). So the EOS slot is right only when the answer stops exactly where the
    reference does, a shorter answer loses the positions it lacks and a longer one its EOS slot."""
    return token_accuracy(answer_span(answer, stop_ids, eos_id), [*reference, eos_id])
