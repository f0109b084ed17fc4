"""Dynamic remasking (DESIGN.md 3.2): invariants on every step for every confidence source, the
remask=False equivalence with upstream, re-masking of committed tokens, UPS fallback, EOS/EoT gating."""
import logging

import pytest
import torch
from torch import nn

from generate import generate
from remedi_patches.confidence import CONFIDENCE_SOURCES, register
from remedi_patches.modeling_wrappers import RemeDiOutput
from remedi_patches.remasking import (Trajectory, commit_counts, commit_schedule, commit_top_n, keep_top_k, rank_last,
                                     remask_block)
from remedi_patches.ups_head import UPSHead
from toy_models import D, EOS, EOT, MASK, PROMPT, SHORT, BareToyMDM, ToyMDM, check_invariants, padded_batch
from upstream_llada import reference_generate

SOURCES = ["ups", "tps_prob", "random", "margin", "entropy"]
SHAPES = [(12, 4, 6), (10, 5, 4)]  # (gen_length, block_length, steps): 3 blocks of k = 2, 4; 2 of k = 3, 5


@pytest.fixture(scope="module")
def toy():
    return ToyMDM().eval()


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(5)
    return UPSHead(D, width=8).eval()


class MaskFavouringUPS(nn.Module):
    """Toy TPS + a UPS that prefers masked positions: every committed token loses to any masked one,
    so with remask=True each step re-masks what the previous step committed (unless k_i = B)."""

    def __init__(self, toy):
        super().__init__()
        self.toy = toy

    def forward(self, x, attention_mask=None):
        ramp = torch.arange(x.shape[1]) * 1e-3  # break ties by position
        return RemeDiOutput(self.toy(x, attention_mask).logits, torch.where(x == MASK, 5.0, -5.0) + ramp)


class EndFavouring(nn.Module):
    """Toy whose candidates at every even answer position are EOS (or EoT when divisible by 4) with
    probability ~1, and never EOS / EoT elsewhere; returns RemeDiOutput with a UPS head on top."""

    def __init__(self, toy, head, prompt_len):
        super().__init__()
        self.toy, self.head, self.prompt_len = toy, head, prompt_len

    def forward(self, x, attention_mask=None):
        out = self.toy(x, attention_mask, output_hidden_states=True)
        logits = out.logits.clone()
        logits[..., [EOS, EOT]] = -torch.inf
        answer = torch.arange(x.shape[1]) - self.prompt_len
        logits[:, (answer >= 0) & (answer % 2 == 0), EOS] = 30.0
        logits[:, (answer >= 0) & (answer % 4 == 0), EOT] = 40.0
        return RemeDiOutput(logits, self.head(out.hidden_states[-1]))


def run(model, prompt, am, shape, **kw):
    gen_length, block_length, steps = shape
    trajectory = Trajectory(keep_tokens=True)
    out = generate(model, prompt, am, steps=steps, gen_length=gen_length, block_length=block_length,
                   mask_id=MASK, eos_id=EOS, eot_id=EOT, trajectory=trajectory, **kw)
    return out, trajectory


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("remask", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_invariants_every_step(toy, head, source, remask, temperature):
    ids, am = padded_batch()
    for shape in SHAPES:
        torch.manual_seed(0)
        out, trajectory = run(toy, ids, am, shape, temperature=temperature, confidence_source=source,
                              ups_head=head, remask=remask)
        check_invariants(out, trajectory, ids, shape, remask)


@pytest.mark.parametrize("source", SOURCES)
def test_invariants_with_cfg(toy, head, source):
    torch.manual_seed(0)
    out, trajectory = run(toy, PROMPT, None, (12, 4, 6), cfg_scale=1.5, temperature=0.7, confidence_source=source,
                          ups_head=head)
    check_invariants(out, trajectory, PROMPT, (12, 4, 6), remask=True)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("source,rule", [("tps_prob", "low_confidence"), ("random", "random")])
def test_no_remask_equals_upstream(toy, temperature, cfg_scale, shape, source, rule):
    gen_length, block_length, steps = shape
    ids, am = padded_batch()
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
              cfg_scale=cfg_scale, mask_id=MASK)
    torch.manual_seed(11)
    expected = reference_generate(toy, ids, am, remasking=rule, **kw)
    torch.manual_seed(11)
    got = generate(toy, ids, am, confidence_source=source, remask=False, **kw)
    assert torch.equal(got, expected)


def test_remask_true_remasks_committed_tokens(toy):
    model = MaskFavouringUPS(toy)
    shape = (6, 6, 3)  # k = 2, 4, 6
    out, trajectory = run(model, PROMPT, None, shape, confidence_source="ups", remask=True)
    check_invariants(out, trajectory, PROMPT, shape, remask=True)
    first, second, _ = trajectory.steps
    assert second.remasked.sum() == 2
    assert torch.equal(second.remasked, first.committed)  # exactly what step 1 committed is re-masked
    _, no_remask = run(model, PROMPT, None, shape, confidence_source="ups", remask=False)
    assert not any(rec.remasked.any() for rec in no_remask.steps)


def test_trained_style_head_remasks_on_toy(toy, head):
    """With a real (random) head on hidden states, re-masking happens and invariants hold."""
    ids, am = padded_batch()
    out, trajectory = run(toy, ids, am, (12, 4, 12), confidence_source="ups", ups_head=head)
    check_invariants(out, trajectory, ids, (12, 4, 12), remask=True)
    assert any(rec.remasked.any() for rec in trajectory.steps)


def test_ups_logits_come_from_the_conditional_half(toy):
    class PromptSensitiveUPS(nn.Module):
        """UPS increasing with position when the prompt is visible, decreasing when it is masked."""

        def forward(self, x, attention_mask=None):
            sign = torch.where(x[:, :1] == MASK, -1.0, 1.0)  # (B, 1): -1 in CFG's unconditional copy
            return RemeDiOutput(toy(x, attention_mask).logits, sign * torch.arange(x.shape[1]).float())

    _, trajectory = run(PromptSensitiveUPS(), PROMPT, None, (8, 8, 4), cfg_scale=2.0, confidence_source="ups")
    first = trajectory.steps[0].committed[0]
    assert first.nonzero().flatten().tolist() == [6, 7]  # the top-k_1 = 2 by the conditional UPS


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("source", ["ups", "tps_prob", "margin", "entropy"])
def test_padded_batch_equals_alone(toy, head, source, cfg_scale):
    ids, am = padded_batch()
    kw = dict(steps=6, gen_length=12, block_length=4, mask_id=MASK, cfg_scale=cfg_scale, confidence_source=source,
              ups_head=head)
    batch = generate(toy, ids, am, **kw)
    assert torch.equal(batch[0], generate(toy, PROMPT, **kw)[0])
    assert torch.equal(batch[1, 2:], generate(toy, SHORT, **kw)[0])


def test_ups_without_head_warns_and_uses_tps_prob(toy, caplog):
    kw = dict(steps=6, gen_length=12, block_length=4, mask_id=MASK)
    with caplog.at_level(logging.WARNING):
        out = generate(toy, PROMPT, confidence_source="ups", **kw)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "falling back to 'tps_prob'" in r.message]
    assert len(warnings) == 1
    assert torch.equal(out, generate(toy, PROMPT, confidence_source="tps_prob", **kw))


def test_ups_head_of_wrong_width_raises(toy):
    kw = dict(steps=4, gen_length=8, block_length=4, mask_id=MASK, confidence_source="ups")
    with pytest.raises(ValueError, match=f"hidden size {D + 8}.*hidden size {D}"):
        generate(toy, PROMPT, ups_head=UPSHead(D + 8), **kw)
    configless = BareToyMDM()
    del configless.config  # size only known once the hidden state is seen
    with pytest.raises(ValueError, match=f"expects hidden size {D + 8}.*has size {D}"):
        generate(configless, PROMPT, ups_head=UPSHead(D + 8), **kw)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("source,remask", [(None, False)] + [(s, r) for s in SOURCES for r in (True, False)])
def test_eos_eot_gating_ranks_end_tokens_last(toy, head, source, remask, temperature):
    shape = (12, 6, 6)  # 2 blocks, k = 2, 4, 6: the gated half of each block must wait for the other half
    model = EndFavouring(toy, head, PROMPT.shape[1])
    torch.manual_seed(2)
    out, trajectory = run(model, PROMPT, None, shape, temperature=temperature, confidence_source=source,
                          remask=remask, confidence_eos_eot_inf=True)
    check_invariants(out, trajectory, PROMPT, shape, remask=remask)
    answer_pos = torch.arange(shape[1])
    gated = answer_pos % 2 == 0
    for rec in trajectory.steps:
        block = rec.tokens[0, rec.start:rec.start + shape[1]]
        if (block[gated] != MASK).any():
            assert (block[~gated] != MASK).all(), f"an end token was committed before the others at {rec}"
    assert set(out[0, PROMPT.shape[1]:][::2].tolist()) <= {EOS, EOT}


def test_without_gating_end_tokens_go_first(toy, head):
    """The control for the test above: with probability ~1 the end tokens would be committed first."""
    _, trajectory = run(EndFavouring(toy, head, PROMPT.shape[1]), PROMPT, None, (12, 6, 6))
    assert trajectory.steps[0].committed[0, ::2].sum() == 2


def test_commit_schedule():
    assert commit_counts(10, 4) == [3, 3, 2, 2]
    assert commit_schedule(10, 4) == [3, 6, 8, 10]
    assert commit_schedule(8, 8) == list(range(1, 9))
    for b, s in [(7, 3), (32, 5), (5, 5)]:
        assert sum(commit_counts(b, s)) == b and commit_schedule(b, s)[-1] == b


def test_rank_last_is_finite_and_never_spills():
    conf = torch.tensor([[0.9, 0.1, 0.5, -torch.inf, torch.inf, 0.7]])
    gated = torch.tensor([[True, False, False, False, False, True]])
    ranked = rank_last(conf, gated)
    assert torch.isfinite(ranked[gated]).all()
    assert ranked[0, 3] == -torch.inf and ranked[0, 4] == torch.inf
    assert ranked[0, 0] < ranked[0, 1] and ranked[0, 5] < ranked[0, 1] and ranked[0, 5] < ranked[0, 0]
    assert keep_top_k(ranked, 5)[0].tolist() == [True, True, True, False, True, True]


def test_remask_block_and_the_two_selection_rules():
    block = torch.tensor([[MASK, 7, MASK, 9, MASK]])
    candidates = torch.tensor([[3, 7, 4, 9, 5]])
    conf = torch.tensor([[0.8, 0.1, 0.9, 0.5, 0.2]])
    masked = block == MASK
    keep = keep_top_k(conf, 3)  # RemeDi: the best 3 of the block, committed or not
    assert keep.tolist() == [[True, False, True, True, False]]
    new, committed, remasked = remask_block(block, candidates, keep, MASK)
    assert new.tolist() == [[3, MASK, 4, 9, MASK]]
    assert committed.tolist() == [[True, False, True, False, False]]
    assert remasked.tolist() == [[False, True, False, False, False]]
    chosen = commit_top_n(conf, masked, 2, seq_len=9, start=3)  # upstream: the best 2 masked ones
    assert chosen.tolist() == [[True, False, True, False, False]]
    new, committed, remasked = remask_block(block, candidates, ~masked | chosen, MASK)
    assert new.tolist() == [[3, 7, 4, 9, MASK]] and not remasked.any()


def test_registering_a_source_is_one_function(toy):
    @register("position")
    def position(inp):  # prefer the leftmost positions: a left-to-right decoder
        return -torch.arange(inp.candidates.shape[1], dtype=torch.float32).expand_as(inp.candidates)

    try:
        _, trajectory = run(toy, PROMPT, None, (6, 6, 6), confidence_source="position")
        assert [rec.committed[0].nonzero().flatten().tolist() for rec in trajectory.steps] == [[i] for i in range(6)]
        with pytest.raises(ValueError, match="already registered"):
            register("position")(position)
    finally:
        del CONFIDENCE_SOURCES["position"]
