"""Remask SFT maths: noise statistics and invariants, TPS/UPS losses against hand computations, UPS labels,
and the detection metrics against scikit-learn."""
import math

import pytest
import torch

from remedi_patches.losses import remask_losses, tps_loss, true_token_prob, ups_labels, ups_loss
from remedi_patches.metrics import average_ranks, confusion_at, detection_scores, roc_auc, roc_curve
from remedi_patches.noise import (allowed_token_ids, apply_remask_noise, context_incorrect_noise, random_other_tokens,
                                  rho_incorrect, rho_mask, sample_replacements, sample_t, tps_incorrect_noise)

MASK, EOS, BOS = 30, 1, 0
SPECIAL = [EOS, BOS]
V = 31  # ids 0..30; 30 is the mask, so the incorrect-token pool is 2..29 (28 ids)


def _batch(b=400, l=64, prompt=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, MASK, (b, l), generator=g)
    ids[:, -5:] = EOS  # EOS padding belongs to the answer
    answer = torch.zeros(b, l, dtype=torch.bool)
    answer[:, prompt:] = True
    return ids, answer


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def test_schedules():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(rho_mask(t), t)
    assert torch.allclose(rho_incorrect(t, 0.1), torch.tensor([0.0, 0.075, 0.1, 0.0]))


def test_sample_t_range_and_mean():
    t = sample_t(200_000, eps=0.2, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.2 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.6) < 5 * (0.8 / math.sqrt(12)) / math.sqrt(t.numel())
    with pytest.raises(ValueError, match="eps"):
        sample_t(3, eps=1.5)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_noise_rates_match_schedule(t):
    ids, answer = _batch()
    r = 0.2
    nb = apply_remask_noise(ids, answer, MASK, r, V, SPECIAL, t=t, generator=torch.Generator().manual_seed(1))
    n_answer = int(answer.sum())
    assert _within(int(nb.masked.sum()), n_answer, t)
    n_unmasked = int((answer & ~nb.masked).sum())
    assert _within(int(nb.incorrect.sum()), n_unmasked, 4 * r * t * (1 - t))
    assert torch.equal(nb.p_mask, torch.full_like(nb.p_mask, t))


def test_noise_invariants():
    ids, answer = _batch(b=300)
    nb = apply_remask_noise(ids, answer, MASK, 1.0, V, SPECIAL, generator=torch.Generator().manual_seed(2))
    assert torch.equal(nb.noisy[~answer], ids[~answer])  # the prompt is never touched
    assert not (nb.masked & nb.incorrect).any()
    assert not ((nb.masked | nb.incorrect) & ~answer).any()
    assert torch.equal(nb.noisy == MASK, nb.masked)
    inc = nb.noisy[nb.incorrect]
    assert inc.numel() > 1000
    assert (inc != ids[nb.incorrect]).all()  # an incorrect token always differs from the truth
    assert not torch.isin(inc, torch.tensor(SPECIAL + [MASK])).any()
    assert inc.min() >= 0 and inc.max() < V
    clean = answer & ~nb.masked & ~nb.incorrect
    assert torch.equal(nb.noisy[clean], ids[clean])
    # EOS padding (special, outside the pool) can be corrupted too, into a non-special token
    eos_hit = nb.incorrect & (ids == EOS)
    assert eos_hit.any() and not torch.isin(nb.noisy[eos_hit], torch.tensor(SPECIAL + [MASK])).any()


def test_noise_is_reproducible_with_generator():
    ids, answer = _batch(b=8)
    a = apply_remask_noise(ids, answer, MASK, 0.1, V, SPECIAL, generator=torch.Generator().manual_seed(5))
    b = apply_remask_noise(ids, answer, MASK, 0.1, V, SPECIAL, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_replacement_is_uniform_over_the_other_allowed_ids():
    allowed = allowed_token_ids(8, [0, 7])  # pool 1..6
    assert allowed.tolist() == [1, 2, 3, 4, 5, 6]
    n = 60_000
    tokens = torch.full((n,), 3)
    out = random_other_tokens(tokens, allowed, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out, minlength=8)
    assert counts[[0, 3, 7]].sum() == 0
    for c in counts[[1, 2, 4, 5, 6]]:
        assert _within(int(c), n, 1 / 5)
    outside = random_other_tokens(torch.full((n,), 7), allowed, generator=torch.Generator().manual_seed(1))
    for c in torch.bincount(outside, minlength=8)[1:7]:  # a special id may become any of the 6 pool ids
        assert _within(int(c), n, 1 / 6)


def test_noise_bad_input():
    ids, answer = _batch(b=2)
    with pytest.raises(ValueError, match="r_incorrect"):
        apply_remask_noise(ids, answer, MASK, 1.5, V, SPECIAL)
    with pytest.raises(ValueError, match="differ"):
        apply_remask_noise(ids, answer[:, 1:], MASK, 0.1, V, SPECIAL)
    with pytest.raises(ValueError, match="vocab"):
        apply_remask_noise(ids, answer, 2, 0.1, 3, [0, 1])


# ---------------------------------------------------------------- incorrect_source 'tps'


def test_tps_replacements_are_never_the_truth_nor_special():
    ids, answer = _batch(b=200)
    positions = answer & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.5)
    logits = torch.randn(*ids.shape, V + 3, generator=torch.Generator().manual_seed(4))  # padded past vocab
    logits[..., 5] = 20.0  # most mass on one id: rows whose truth is 5 must still pick another
    out = sample_replacements(logits, ids, positions, V, SPECIAL + [MASK], torch.Generator().manual_seed(5))
    got = out[positions]
    assert torch.equal(out[~positions], ids[~positions])
    assert (got != ids[positions]).all() and (ids[positions] == 5).sum() > 100
    assert not torch.isin(got, torch.tensor(SPECIAL + [MASK])).any() and got.max() < V


def test_tps_replacements_follow_the_distribution():
    n = 4000
    targets = torch.full((1, n), 3)
    logits = torch.zeros(1, n, V)
    logits[..., 3] = 30.0  # the truth is the argmax: excluded
    logits[..., 7] = 10.0  # argmax among the others: ~1 - 27 e^-10 of the rest
    out = sample_replacements(logits, targets, torch.ones(1, n, dtype=torch.bool), V, SPECIAL + [MASK],
                              torch.Generator().manual_seed(0))
    assert (out == 7).float().mean() > 0.95
    soft = torch.zeros(1, n, V)
    soft[..., 9] = math.log(3.0)  # p(9) = 3 / (3 + 26) over the 27 allowed non-truth ids
    out = sample_replacements(soft, targets, torch.ones(1, n, dtype=torch.bool), V, SPECIAL + [MASK],
                              torch.Generator().manual_seed(1))
    assert _within(int((out == 9).sum()), n, 3 / 29)


def test_tps_degenerate_rows_fall_back_to_uniform():
    n = 6000
    logits = torch.full((1, n, V), float("-inf"))
    logits[0, ::2, 4] = float("nan")
    out = sample_replacements(logits, torch.full((1, n), 3), torch.ones(1, n, dtype=torch.bool), V,
                              SPECIAL + [MASK], torch.Generator().manual_seed(0))
    counts = torch.bincount(out[0], minlength=V)
    assert counts[[0, 1, 3, MASK]].sum() == 0
    for c in counts[[2] + list(range(4, MASK))]:
        assert _within(int(c), n, 1 / 27)


def test_tps_noise_keeps_the_sets_and_feeds_masks_to_the_backbone():
    ids, answer = _batch(b=64)
    uniform = apply_remask_noise(ids, answer, MASK, 0.5, V, SPECIAL, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    drawn = apply_remask_noise(ids, answer, MASK, 0.5, V, SPECIAL, generator=g)
    seen = []

    def logits_fn(x):  # a fake backbone: peaked on (token id + 1) of the input, masks predict 11
        seen.append(x)
        return torch.nn.functional.one_hot(torch.where(x == MASK, 11, (x + 1) % V), V).float() * 8.0

    tps = tps_incorrect_noise(logits_fn, ids, drawn, MASK, V, SPECIAL, g)
    for field in ("t", "p_mask", "masked", "incorrect"):  # same t and sets as the uniform source for the seed
        assert torch.equal(getattr(tps, field), getattr(uniform, field))
    (x,) = seen
    assert torch.equal(x == MASK, tps.masked | tps.incorrect) and torch.equal(x[~answer], ids[~answer])
    clean = ~tps.incorrect
    assert torch.equal(tps.noisy[clean], uniform.noisy[clean])
    inc = tps.noisy[tps.incorrect]
    assert (inc != ids[tps.incorrect]).all() and not torch.isin(inc, torch.tensor(SPECIAL + [MASK])).any()
    assert ((inc == 11) | (ids[tps.incorrect] == 11)).float().mean() > 0.9  # the backbone's guess, not uniform


def test_tps_replacements_do_not_depend_on_the_batching():
    ids, answer = _batch(b=12)
    logits = torch.randn(12, ids.shape[1], V, generator=torch.Generator().manual_seed(0))
    whole = sample_replacements(logits, ids, answer, V, SPECIAL, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    parts = [sample_replacements(logits[r], ids[r], answer[r], V, SPECIAL, g) for r in (slice(0, 5), slice(5, 12))]
    assert torch.equal(torch.cat(parts), whole)


# ---------------------------------------------------------------- losses


def _toy():
    torch.manual_seed(0)
    b, l, v = 2, 5, 7
    logits = torch.randn(b, l, v, requires_grad=True)
    targets = torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]])
    masked = torch.tensor([[0, 0, 1, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    incorrect = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    noisy = targets.clone()
    noisy[masked] = 9
    noisy[0, 3], noisy[1, 4] = 0, 0
    answer_mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    answer_len = answer_mask.sum(1)
    p_mask = torch.tensor([[0.4] * l, [0.7] * l])
    return logits, targets, noisy, masked, incorrect, answer_mask, answer_len, p_mask


def test_tps_loss_matches_hand_computation():
    logits, targets, _, masked, _, _, answer_len, p_mask = _toy()
    expected = 0.0
    for bi in range(2):
        for i in range(5):
            if masked[bi, i]:
                ce = -torch.log_softmax(logits[bi, i], -1)[targets[bi, i]]
                expected = expected + ce / p_mask[bi, i] / answer_len[bi]
    expected = expected / 2
    got = tps_loss(logits, targets, masked, p_mask, answer_len)
    assert torch.allclose(got, expected)
    got.backward()
    assert logits.grad[~masked].abs().sum() == 0  # only masked positions carry TPS gradient


def test_ups_labels_follow_design():
    logits, targets, noisy, masked, incorrect, *_ = _toy()
    labels = ups_labels(logits, targets, noisy, masked, incorrect)
    probs = torch.softmax(logits.detach(), -1)
    for bi in range(2):
        for i in range(5):
            if masked[bi, i]:
                assert torch.isclose(labels[bi, i], probs[bi, i, targets[bi, i]])
            elif incorrect[bi, i]:
                assert labels[bi, i] == 0.0
            else:
                assert labels[bi, i] == 1.0
    assert not labels.requires_grad  # stop-gradient
    assert torch.allclose(true_token_prob(logits, targets), probs.gather(-1, targets[..., None]).squeeze(-1))


def test_smoothed_ups_labels_follow_the_paper():
    """eps = 0.05: 1 - eps for a clean token, eps for an incorrect one, eps + (1 - 2 eps) p_TPS for a masked one."""
    logits, targets, noisy, masked, incorrect, *_ = _toy()
    eps = 0.05
    plain = ups_labels(logits, targets, noisy, masked, incorrect)
    smooth = ups_labels(logits, targets, noisy, masked, incorrect, label_smoothing=eps)
    p = true_token_prob(logits, targets)
    clean = ~masked & ~incorrect
    assert torch.allclose(smooth[clean], torch.full_like(smooth[clean], 1 - eps))
    assert torch.allclose(smooth[incorrect], torch.full_like(smooth[incorrect], eps))
    assert torch.allclose(smooth[masked], eps + (1 - 2 * eps) * p[masked])
    assert torch.equal(ups_labels(logits, targets, noisy, masked, incorrect, label_smoothing=0.0), plain)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ups_labels(logits, targets, noisy, masked, incorrect, label_smoothing=0.5)


def test_context_incorrect_tokens_come_from_the_batch_and_never_equal_the_truth():
    """The pool is the batch's x_t without special tokens (masks, EOS padding), counted with multiplicity; a draw
    is uniform over the pool entries that differ from the truth; t and the masked / incorrect sets are kept."""
    ids, answer = _batch(b=64, l=32, prompt=8)
    ids[:, :8] = torch.randint(2, 6, (64, 8), generator=torch.Generator().manual_seed(1))  # prompts: ids 2..5 only
    g = torch.Generator().manual_seed(0)
    batch = apply_remask_noise(ids, answer, MASK, 1.0, V, SPECIAL, t=0.5, generator=g)
    out = context_incorrect_noise(ids, batch, MASK, V, SPECIAL, generator=g)
    assert torch.equal(out.masked, batch.masked) and torch.equal(out.incorrect, batch.incorrect)
    assert torch.equal(out.noisy[~batch.incorrect], batch.noisy[~batch.incorrect])
    drawn, truth = out.noisy[batch.incorrect], ids[batch.incorrect]
    assert drawn.numel() > 100 and not (drawn == truth).any()
    x_t = torch.where(batch.masked, MASK, ids)
    pool = x_t[(x_t != MASK) & (x_t != EOS) & (x_t != BOS)]
    assert torch.isin(drawn, pool).all() and not torch.isin(drawn, torch.tensor([MASK, EOS, BOS])).any()
    # frequencies follow the pool's: the prompt-only ids 2..5 are drawn far more often than an answer-only id
    counts = torch.bincount(pool, minlength=V).float()
    truth_token = int(truth[0])
    wanted = counts.clone()
    wanted[truth_token] = 0
    draws = torch.stack([context_incorrect_noise(ids, batch, MASK, V, SPECIAL,
                                                 torch.Generator().manual_seed(s)).noisy[batch.incorrect][0]
                         for s in range(2000)])
    observed = torch.bincount(draws, minlength=V).float()
    expected = 2000 * wanted / wanted.sum()
    assert observed[truth_token] == 0
    assert ((observed - expected).abs() <= 5 * expected.sqrt() + 5).all()


def test_context_pool_of_only_the_truth_falls_back_to_uniform():
    ids = torch.full((1, 6), 7)
    answer = torch.tensor([[False, False, True, True, True, True]])
    batch = apply_remask_noise(ids, answer, MASK, 1.0, V, SPECIAL, t=0.5, generator=torch.Generator().manual_seed(0))
    out = context_incorrect_noise(ids, batch, MASK, V, SPECIAL, generator=torch.Generator().manual_seed(0))
    drawn = out.noisy[batch.incorrect]
    assert drawn.numel() > 0 and not (drawn == 7).any() and not torch.isin(drawn, torch.tensor([MASK, EOS, BOS])).any()


def test_ups_labels_reject_inconsistent_noise():
    logits, targets, noisy, masked, incorrect, *_ = _toy()
    bad = incorrect.clone()
    bad[0, 1] = True  # claims an incorrect token where the token is the truth
    with pytest.raises(ValueError, match="incorrect flags"):
        ups_labels(logits, targets, noisy, masked, bad)


def test_ups_loss_matches_hand_computation():
    logits, targets, noisy, masked, incorrect, answer_mask, _, _ = _toy()
    labels = ups_labels(logits, targets, noisy, masked, incorrect)
    h = torch.randn(2, 5)
    s = torch.sigmoid(h)
    terms = [-(labels[b, i] * torch.log(s[b, i]) + (1 - labels[b, i]) * torch.log(1 - s[b, i]))
             for b in range(2) for i in range(5) if answer_mask[b, i]]
    expected = torch.stack(terms).mean()  # mean over all answer positions of the batch
    assert torch.allclose(ups_loss(h, labels, answer_mask), expected, atol=1e-6)


def test_remask_losses_total_and_gradient_paths():
    logits, targets, noisy, masked, incorrect, answer_mask, answer_len, p_mask = _toy()
    hidden = torch.randn(2, 5, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    ups_logits = hidden.detach() @ w  # head on detached hidden states, as the trainer does
    out = remask_losses(logits, ups_logits, targets, noisy, masked, incorrect, p_mask, answer_mask, answer_len, 0.5)
    assert torch.allclose(out.total, out.tps + 0.5 * out.ups)
    logits.grad = None
    out.ups.backward()
    assert logits.grad is None and hidden.grad is None and w.grad is not None  # UPS never reaches the TPS


# ---------------------------------------------------------------- metrics


def test_average_ranks_with_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auc_roc_confusion_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2000, generator=g) < 0.2
    s = (torch.rand(2000, generator=g) + 0.5 * y).mul(10).round() / 10  # many ties
    assert roc_auc(s, y) == pytest.approx(metrics.roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
    fpr, tpr, thr = roc_curve(s, y)
    fpr_ref, tpr_ref, thr_ref = metrics.roc_curve(y.numpy(), s.numpy(), drop_intermediate=False)
    assert torch.allclose(fpr, torch.from_numpy(fpr_ref)) and torch.allclose(tpr, torch.from_numpy(tpr_ref))
    assert torch.equal(thr[1:], torch.from_numpy(thr_ref[1:]).double())
    c = confusion_at(s, y, 0.7)
    tn, fp, fn, tp = metrics.confusion_matrix(y.numpy(), (s >= 0.7).numpy()).ravel()
    assert (c.tp, c.fp, c.tn, c.fn) == (tp, fp, tn, fn)
    assert c.precision == pytest.approx(tp / (tp + fp)) and c.recall == pytest.approx(tp / (tp + fn))


def test_auc_edge_cases():
    assert roc_auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert roc_auc([0.1, 0.8, 0.9], [1, 1, 0]) == 0.0
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5
    assert math.isnan(roc_auc([0.5, 0.4], [1, 1]))
    with pytest.raises(ValueError, match="same number"):
        roc_auc([0.5], [1, 0])


def test_detection_scores_use_unmasked_answer_tokens():
    h = torch.tensor([[2.0, -1.0, 0.0, 3.0]])
    incorrect = torch.tensor([[False, True, False, False]])
    masked = torch.tensor([[False, False, True, False]])
    answer = torch.tensor([[False, True, True, True]])
    scores, labels = detection_scores(h, incorrect, masked, answer)
    assert torch.allclose(scores, 1 - torch.sigmoid(torch.tensor([-1.0, 3.0])))
    assert labels.tolist() == [True, False]
