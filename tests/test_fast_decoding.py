"""Fast decoding (DESIGN.md 12): Fast-dLLM's parallel unmasking (threshold / factor) and approximate KV caches
(prefix / dual) in LLaDA-style decoding, the parallel rules in block diffusion, and the NFE / tokens / seconds of
the Trajectory.

- a threshold nothing reaches degenerates to the fixed one-token-per-step schedule (same tokens, same records, NFE
  gen_length); threshold 0 (and a factor >= block_length + 1) commit the whole block in one step;
- parallel_counts / top_k_mask / commit_top_n against rules written out here;
- a cache refreshed every step equals no cache exactly, on every project model that takes the cache;
- cache mechanics on SequenceReader: reads right after a refresh equal the whole-sequence forward, the read
  schedule (which forwards feed what), the dual cache writes only the block, the prefix cache never grows;
- per-step invariants in every mode ({fixed, threshold, factor} x {no cache, prefix, dual} x {upstream, re-masking});
- bad settings refused with one clear error (library, SamplerSettings, sample(), the generate.py command line);
- the embedded trained model decodes finished answers with the approximate caches and fewer forwards in parallel.
"""
import math
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cli_helpers import assert_user_error, run_cli
from remedi_patches.backbones import EvalModel
from remedi_patches.block_decoding import block_generate
from remedi_patches.llada_cache import CACHES, SequenceReader, takes_cache
from remedi_patches.modeling_wrappers import UPSModel, hidden_size_of
from remedi_patches.remasking import Trajectory, commit_top_n, keep_top_k, parallel_counts, top_k_mask
from remedi_patches.sampling import BLOCK_CACHE_ERROR, SamplerSettings, check_decoding, generate, sample
from remedi_patches.ups_head import UPSHead
from test_block_decoding import REAL_MODELS, real_prompts
from toy_models import D, EOS, EOT, MASK, PAD, V, CacheToyMDM, DualCacheToyMDM, ToyMDM, check_invariants, padded_batch

pytestmark = pytest.mark.usefixtures("one_thread")
NOTHING_PASSES = 1.0 + 1e-3  # above every probability: the parallel rules accept no position
DECODERS = {"generate": generate, "block_generate": block_generate}


class SharpToy(CacheToyMDM):
    """CacheToyMDM (takes the cache arguments) with its logits scaled up: confident enough that threshold 0.7 and
    factor 1 commit several tokens in some steps and one in others."""

    def __init__(self, seed: int = 0, scale: float = 3.0) -> None:
        super().__init__(seed)
        self.scale = scale

    def forward(self, idx, attention_mask=None, *, position_ids=None, past_key_values=None, use_cache=False):
        out = super().forward(idx, attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                              use_cache=use_cache)
        out.logits = out.logits * self.scale
        return out


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(5)
    return UPSHead(D, width=8).eval()


@pytest.fixture(scope="module")
def sharp():
    return SharpToy().eval()


def run(decoder, model, prompt, am, shape, seed=0, **kw):
    """One sampler call (generate or block_generate) recording every step with its tokens."""
    gen_length, block_length, steps = shape
    trajectory = Trajectory(keep_tokens=True)
    kw.setdefault("eos_id", None)  # block decoding: no EOS stop, every block is decoded
    torch.manual_seed(seed)
    out = DECODERS[decoder](model, prompt, am, steps=steps, gen_length=gen_length, block_length=block_length,
                            mask_id=MASK, eot_id=EOT, trajectory=trajectory, **kw)
    return out, trajectory


def same_records(a: Trajectory, b: Trajectory) -> bool:
    return len(a.steps) == len(b.steps) and all(
        (x.block, x.step, x.start) == (y.block, y.step, y.start) and torch.equal(x.committed, y.committed)
        and torch.equal(x.remasked, y.remasked) and torch.equal(x.mask_count, y.mask_count)
        for x, y in zip(a.steps, b.steps))


def mode_kwargs(mode: str, head) -> tuple[type, dict]:
    """(model class, sampler kwargs) of the modes the degenerate / whole-block tests run."""
    return {
        "upstream": (CacheToyMDM, dict(confidence_source=None)),
        "upstream-random": (CacheToyMDM, dict(confidence_source=None, remasking="random")),
        "tps_prob": (CacheToyMDM, dict(confidence_source="tps_prob")),
        "tps_prob-no_remask": (CacheToyMDM, dict(confidence_source="tps_prob", remask=False)),
        "ups-head": (CacheToyMDM, dict(confidence_source="ups", ups_head=head)),
        "ups-dual-stream": (DualCacheToyMDM, dict(confidence_source="ups")),
        "random": (CacheToyMDM, dict(confidence_source="random")),
    }[mode]


# ---------------------------------------------------------------- a threshold nothing reaches: the fixed schedule


@pytest.mark.parametrize("mode", ["upstream", "upstream-random", "tps_prob", "ups-head", "ups-dual-stream"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_threshold_above_every_confidence_equals_one_token_per_step(head, decoder, temperature, mode):
    """threshold 1 + eps: each step takes the floor of one token, i.e. the fixed schedule with steps = gen_length
    (same tokens for the same seed, same step records); NFE = gen_length in generate() (block decoding adds the
    prompt and the appends); upstream commits exactly one position per row and step, re-masking nets one."""
    cls, kw = mode_kwargs(mode, head)
    model = cls(seed=1).eval()
    ids, am = padded_batch()
    gen_length, block_length = 12, 4
    fixed, fixed_tr = run(decoder, model, ids, am, (gen_length, block_length, gen_length), temperature=temperature,
                          **kw)
    out, tr = run(decoder, model, ids, am, (gen_length, block_length, 3), temperature=temperature,
                  threshold=NOTHING_PASSES, **kw)  # steps=3 (one per block): only checked, not used
    assert torch.equal(out, fixed)
    assert same_records(tr, fixed_tr)
    assert len(tr.steps) == gen_length
    if decoder == "generate":
        assert tr.forwards == gen_length == fixed_tr.forwards
    else:
        assert tr.forwards == fixed_tr.forwards == 1 + gen_length + (gen_length // block_length - 1)
    upstream = kw.get("confidence_source") is None
    for rec in tr.steps:
        assert (rec.mask_count == block_length - rec.step - 1).all()  # one mask fewer per row and step
        net = rec.committed.sum(-1) - rec.remasked.sum(-1)
        assert (net == 1).all()
        if upstream:
            assert (rec.committed.sum(-1) == 1).all() and not rec.remasked.any()
    assert not (out == MASK).any()


class TiedConfidence(nn.Module):
    """Every masked position has the same candidate probability (as equal bf16 confidences); the candidate is the
    number of tokens already decoded, so the order in which positions are committed shows in the tokens."""

    def forward(self, idx, attention_mask=None):
        logits = torch.zeros(*idx.shape, V)
        done = (idx != MASK).sum(-1)  # (B,)
        logits[torch.arange(idx.shape[0]), :, done % V] = 5.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("mode", ["upstream", "tps_prob"])
def test_threshold_above_every_confidence_equals_one_token_per_step_under_ties(mode):
    """Every masked position equally confident: the per-row count (one for every row) breaks ties as the fixed
    schedule's top-k does, so the tokens are still the same."""
    kw = {} if mode == "upstream" else dict(confidence_source="tps_prob")
    prompt = torch.tensor([[3, 4]])
    fixed = generate(TiedConfidence(), prompt, None, 8, 8, 8, mask_id=MASK, **kw)
    parallel = generate(TiedConfidence(), prompt, None, 8, 8, 8, mask_id=MASK, threshold=NOTHING_PASSES, **kw)
    assert torch.equal(parallel, fixed)


def test_a_threshold_is_not_the_fixed_schedule_when_confidences_pass(sharp):
    """The degenerate equality above is not vacuous: on a confident model threshold 0.7 takes fewer steps and
    several tokens in one step."""
    ids, am = padded_batch()
    _, tr = run("generate", sharp, ids, am, (12, 4, 12), threshold=0.7)
    assert tr.forwards < 12 and any((rec.committed.sum(-1) > 1).any() for rec in tr.steps)


# ---------------------------------------------------------------- threshold 0: the whole block in one step


@pytest.mark.parametrize("rule", [dict(threshold=0.0), dict(factor=5.0)], ids=["threshold0", "factor5"])
@pytest.mark.parametrize("mode", ["upstream", "upstream-random", "tps_prob", "tps_prob-no_remask", "ups-head",
                                  "ups-dual-stream", "random"])
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_threshold_zero_commits_the_whole_block_in_one_step(head, decoder, mode, rule):
    """Confidences >= 0 all pass threshold 0 (and factor 5, whose bound 1 - 5 / (n + 1) is <= 0 for every n <= 4 =
    block_length): one step per block, committing every position of it; NFE = number of blocks in generate()."""
    cls, kw = mode_kwargs(mode, head)
    model = cls(seed=1).eval()
    ids, am = padded_batch()
    gen_length, block_length = 12, 4
    blocks = gen_length // block_length
    out, tr = run(decoder, model, ids, am, (gen_length, block_length, 12), temperature=0.5, **rule, **kw)
    assert [(rec.block, rec.step) for rec in tr.steps] == [(b, 0) for b in range(blocks)]
    assert all(rec.committed.all() and not rec.remasked.any() and (rec.mask_count == 0).all() for rec in tr.steps)
    assert tr.forwards == (blocks if decoder == "generate" else 1 + blocks + (blocks - 1))
    assert not (out == MASK).any()


# ---------------------------------------------------------------- the selection maths, against rules written here


def factor_count(confidence: list, eligible: list, factor: float) -> int:
    """Fast-dLLM's factor rule for one row: the eligible confidences sorted descending; the n-th (1-based) passes
    when >= 1 - factor / (n + 1); the count is the length of the passing run from the top."""
    ranked = sorted((c for c, e in zip(confidence, eligible) if e), reverse=True)
    count = 0
    for n, c in enumerate(ranked, start=1):
        if c < 1 - factor / (n + 1):
            break
        count += 1
    return count


HAND_ROWS = [  # (confidences, eligible): bounds for factor 1 are 0.5, 0.667, 0.75, 0.8, 0.833, ...
    ([0.95, 0.9, 0.85, 0.99, 0.1, 0.2], [1, 1, 1, 1, 1, 1]),   # the four largest pass (0.85 >= 0.8), 0.2 fails
    ([0.99, 0.7, 0.6, 0.98, 0.97, 0.3], [0, 1, 1, 0, 0, 1]),   # 0.7 passes, 0.6 < 0.667: the ineligible 0.99s
    ([0.4, 0.45, 0.3, 0.2, 0.1, 0.05], [1, 1, 1, 1, 1, 1]),    # the first already fails: 0
    ([0.75, 0.9, 0.8, 0.5, 0.0, 0.0], [1, 1, 1, 0, 0, 0]),     # 0.9, 0.8, 0.75: the exact bound 0.75 passes -> 3
    ([0.9, 0.8, 0.7, 0.1, 0.0, 0.0], [1, 1, 1, 1, 1, 1]),      # first fails after index 0: 0.7 < 0.75 -> 2
    ([0.9, 0.9, 0.9, 0.9, 0.9, 0.9], [0, 0, 0, 0, 0, 0]),      # nothing eligible: 0
    ([0.5, 0.99, 0.99, 0.0, 0.0, 0.0], [1, 0, 0, 0, 0, 0]),    # the exact bound 0.5 (n = 1) passes -> 1
]


def test_factor_counts_equal_the_rule_on_hand_made_rows():
    """parallel_counts(factor=...) equals the rule written out, on rows with ineligible confident positions, a
    row failing at once, a row failing after index 0, exact bounds (0.5 at n = 1, 0.75 at n = 3), an empty row."""
    confidence = torch.tensor([row for row, _ in HAND_ROWS])
    eligible = torch.tensor([e for _, e in HAND_ROWS], dtype=torch.bool)
    for factor in (1.0, 0.5, 1.5):
        expected = [factor_count(c, e, factor) for c, e in HAND_ROWS]
        got = parallel_counts(confidence, eligible, factor=factor)
        assert got.dtype == torch.long and got.tolist() == expected, factor
    assert parallel_counts(confidence, eligible, factor=1.0).tolist() == [4, 1, 0, 3, 2, 0, 1]
    # (counting row 1's ineligible 0.99, 0.98, 0.97 would give 3, not 1)


def test_factor_and_threshold_counts_equal_the_rules_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    confidence = torch.rand(64, 9, generator=gen) ** 0.3  # mostly high: long passing runs
    eligible = torch.rand(64, 9, generator=gen) < 0.7
    for factor in (0.3, 1.0, 1.7):
        expected = [factor_count(c, e, factor) for c, e in zip(confidence.tolist(), eligible.tolist())]
        assert parallel_counts(confidence, eligible, factor=factor).tolist() == expected
    for threshold in (0.0, 0.6, 0.9, 1.0):
        expected = [sum(e and c >= threshold for c, e in zip(cs, es))
                    for cs, es in zip(confidence.tolist(), eligible.tolist())]
        assert parallel_counts(confidence, eligible, threshold=threshold).tolist() == expected


def test_threshold_counts_the_eligible_positions_at_or_above_it():
    confidence = torch.tensor([[0.9, 0.95, 0.5, 0.9], [0.1, 0.2, 0.3, 0.4]])
    eligible = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert parallel_counts(confidence, eligible, threshold=0.9).tolist() == [2, 0]  # 0.9 itself passes; 0.95 not
    assert parallel_counts(confidence, eligible, threshold=0.0).tolist() == [3, 4]
    for both in (dict(), dict(threshold=0.9, factor=1.0)):
        with pytest.raises(ValueError, match="exactly one of threshold and factor"):
            parallel_counts(confidence, eligible, **both)


def test_top_k_mask_with_per_row_counts_picks_each_rows_largest():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 7, generator=gen)
    k = torch.tensor([0, 1, 3, 6, 7])
    chosen = top_k_mask(scores, k)
    for row, n in zip(range(5), k.tolist()):
        assert set(chosen[row].nonzero().flatten().tolist()) == set(scores[row].topk(n).indices.tolist())
    assert chosen.sum(-1).tolist() == k.tolist()
    assert torch.equal(keep_top_k(scores, k), chosen)
    for n in range(8):  # a tensor of equal counts picks what the int count picks
        assert torch.equal(top_k_mask(scores, torch.full((5,), n)), top_k_mask(scores, n))
    tied = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [1.0, 2.0, 2.0, 2.0, 0.0]])
    assert torch.equal(top_k_mask(tied, torch.tensor([2, 2])), top_k_mask(tied, 2))  # ties as under the fixed k
    assert top_k_mask(tied, torch.tensor([2, 1])).tolist() == [[False, True, True, False, False],
                                                               [False, True, False, False, False]]  # stable


def test_commit_top_n_with_per_row_counts_commits_only_masked_positions():
    confidence = torch.tensor([[0.9, 0.1, 0.8, 0.7], [0.2, 0.95, 0.3, 0.4]])
    masked = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    chosen = commit_top_n(confidence, masked, torch.tensor([2, 1]), seq_len=10, start=3)
    assert chosen.tolist() == [[False, False, True, True], [False, False, False, True]]
    assert commit_top_n(confidence, masked, torch.tensor([0, 3]), 10, 3).tolist() == [
        [False, False, False, False], [True, False, True, True]]


# ---------------------------------------------------------------- a cache refreshed every step is exact


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_cache_refreshed_every_step_equals_no_cache_on_the_project_models(name, cache):
    """cache_interval=1: every step is a whole-sequence forward through the cache path; the tokens equal the
    uncached decode exactly (left-padded batch, temperature > 0, CFG, a UPS head via ups_head= on the single-stream
    models, the dual-stream models' own UPS, a parallel rule)."""
    model, mask_id = REAL_MODELS[name]()
    assert takes_cache(model)
    own_ups = getattr(model, "has_ups_stream", False)
    head = None if own_ups else UPSHead(hidden_size_of(model), width=8).eval()
    ids, am = real_prompts(mask_id)
    cases = [dict(confidence_source="tps_prob", temperature=0.8),
             dict(temperature=0.6, cfg_scale=1.0),  # upstream LLaDA with classifier-free guidance
             dict(confidence_source="ups", ups_head=head, temperature=0.8, cfg_scale=0.5),
             dict(confidence_source="tps_prob", remask=False, threshold=0.2, temperature=0.8)]
    approximate = []
    for kw in cases:
        outs, trajectories = [], []
        for c, interval in ((None, None), (cache, 1), (cache, None)):
            torch.manual_seed(7)
            trajectories.append(Trajectory())
            outs.append(generate(model, ids, am, steps=8, gen_length=16, block_length=8, mask_id=mask_id, eos_id=None,
                                 cache=c, cache_interval=interval, trajectory=trajectories[-1], **kw))
        assert torch.equal(outs[0], outs[1]), kw
        assert same_records(trajectories[0], trajectories[1]) and trajectories[0].forwards == trajectories[1].forwards
        approximate.append(torch.equal(outs[0], outs[2]))
    assert not all(approximate)  # refreshed once per block the cache is stale: the reads did go through it


# ---------------------------------------------------------------- cache mechanics (SequenceReader, KVCache)


def partly_decoded(mask_id: int, cfg: bool = False):
    """A left-padded batch in the middle of a decode: prompt (6), block 0 filled, block 1 (the block read) half
    filled, block 2 masked. -> (x (2, 30), attention mask over the whole sequence, block slice, uncond positions)."""
    ids, am = real_prompts(mask_id)
    gen = torch.Generator().manual_seed(2)
    answer = torch.randint(0, mask_id, (2, 24), generator=gen)
    answer[:, 12:] = mask_id
    answer[0, 9] = answer[1, 8] = mask_id
    x = torch.cat([ids, answer], dim=1)
    full_am = torch.cat([am, torch.ones(2, 24, dtype=am.dtype)], dim=1)
    uncond = torch.zeros_like(x, dtype=torch.bool)
    uncond[:, :ids.shape[1]] = True
    return x, torch.cat([full_am, full_am]) if cfg else full_am, slice(14, 22), uncond


def with_head(model):
    """The dual-stream models as they are; a single-stream one under a UPS head (UPSModel), so every read has UPS
    logits."""
    if getattr(model, "has_ups_stream", False):
        return model
    torch.manual_seed(4)
    return UPSModel(model, UPSHead(hidden_size_of(model), width=8).eval())


def input_widths(model) -> tuple[list, object]:
    """(list that collects the width of every forward's input ids, the hook handle)."""
    widths = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(args[0].shape[1]),
                                             with_kwargs=True)
    return widths, handle


def changed_block(x: torch.Tensor, block: slice, mask_id: int) -> torch.Tensor:
    """x with a different token at every position of the block."""
    new = x.clone()
    old = x[:, block]
    new[:, block] = torch.where(old == mask_id, 3, (old + 1) % mask_id)
    return new


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
@torch.no_grad()  # as the samplers read
def test_cache_reads_right_after_a_refresh_equal_the_whole_sequence_forward(name, cfg_scale):
    """Step 0 refreshes (one whole-sequence forward); step 1 on the unchanged x reads through the cache (prefix:
    the block and the suffix; dual: the block alone) and gives the whole-sequence forward's block logits and UPS
    logits."""
    model, mask_id = REAL_MODELS[name]()
    model = with_head(model)
    x, am, block, uncond = partly_decoded(mask_id, cfg=cfg_scale > 0)
    kw = dict(cfg_scale=cfg_scale, uncond_positions=uncond, mask_id=mask_id)
    exact, exact_ups = SequenceReader(model, am, **kw).read(x, block, 0)
    assert exact.shape[:2] == (2, block.stop - block.start) and exact_ups is not None
    for cache, width in (("prefix", x.shape[1] - block.start), ("dual", block.stop - block.start)):
        reader = SequenceReader(model, am, cache=cache, **kw)
        widths, handle = input_widths(model)
        try:
            refreshed = reader.read(x, block, 0)
            cached = reader.read(x, block, 1)
        finally:
            handle.remove()
        assert widths == [x.shape[1], width] and reader.forwards == 2
        for logits, ups in (refreshed, cached):
            torch.testing.assert_close(logits, exact, rtol=0, atol=1e-5)
            torch.testing.assert_close(ups, exact_ups, rtol=0, atol=1e-5)


def snapshot(kv) -> dict:
    return {layer: (k.clone(), v.clone()) for layer, (k, v) in kv._kv.items()}


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
@torch.no_grad()  # as the samplers read
def test_dual_cache_read_writes_the_block_keys_only(name):
    """After a refresh, a dual read with new block tokens overwrites the block's cached keys / values in every
    layer (UPS-stream layers included) and leaves every other position bit-identical; no position is added."""
    model, mask_id = REAL_MODELS[name]()
    x, am, block, _ = partly_decoded(mask_id)
    reader = SequenceReader(model, am, cache="dual", mask_id=mask_id)
    reader.read(x, block, 0)
    kv = reader.kv
    before, key_mask = snapshot(kv), kv.key_mask.clone()
    assert len(before) >= 2 and len(kv) == x.shape[1]
    reader.read(changed_block(x, block, mask_id), block, 1)
    assert reader.kv is kv and len(kv) == x.shape[1] and torch.equal(kv.key_mask, key_mask)
    assert sorted(kv._kv) == sorted(before)
    outside = torch.ones(x.shape[1], dtype=torch.bool)
    outside[block] = False
    for layer, (k, v) in kv._kv.items():
        old_k, old_v = before[layer]
        assert k.shape == old_k.shape and v.shape == old_v.shape, layer
        assert torch.equal(k[:, :, outside], old_k[:, :, outside]) and torch.equal(v[:, :, outside],
                                                                                   old_v[:, :, outside]), layer
        for new, old in ((k, old_k), (v, old_v)):  # (B, H, N, hd): every block position rewritten
            assert (new[:, :, block] != old[:, :, block]).any(dim=-1).any(dim=1).all(), layer


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_dual_cache_reads_with_gradients_enabled(name):
    """The cache owns what it stores, so a dual read may write into it in place outside torch.no_grad too (the
    SMDM keys / values are views of the qkv projection)."""
    model, mask_id = REAL_MODELS[name]()
    x, am, block, _ = partly_decoded(mask_id)
    reader = SequenceReader(model, am, cache="dual", mask_id=mask_id)
    reader.read(x, block, 0)
    logits, _ = reader.read(changed_block(x, block, mask_id), block, 1)
    assert logits.isfinite().all()


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
@torch.no_grad()  # as the samplers read
def test_prefix_cache_is_cut_at_the_block_and_never_grows(name):
    """The refresh writes the whole sequence, the prefix cache keeps the positions before the block; later reads
    (with changed block tokens) neither write nor grow it."""
    model, mask_id = REAL_MODELS[name]()
    x, am, block, _ = partly_decoded(mask_id)
    reader = SequenceReader(model, am, cache="prefix", mask_id=mask_id)
    reader.read(x, block, 0)
    kv = reader.kv
    assert len(kv) == block.start and all(k.shape[-2] == v.shape[-2] == block.start for k, v in kv._kv.values())
    assert torch.equal(kv.key_mask, am[:, :block.start].bool())
    before = snapshot(kv)
    y = changed_block(x, block, mask_id)
    for step in (1, 2):
        reader.read(y, block, step)
        y = changed_block(y, block, mask_id)
        assert reader.kv is kv and len(kv) == block.start
        assert all(torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])
                   for layer, (k, v) in kv._kv.items())


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("cache,interval", [(None, None), ("prefix", None), ("prefix", 2), ("dual", None),
                                            ("dual", 2), ("dual", 1)])
def test_refresh_schedule_of_the_caches(cache, interval, cfg_scale):
    """Which forwards generate() runs: no cache = the whole sequence every step; a cache refreshes with the whole
    sequence at each block's first step and every `interval` steps, and otherwise feeds the block and the suffix
    (prefix) or the block alone (dual). NFE = steps either way."""
    model = CacheToyMDM().eval()
    ids, am = padded_batch()
    widths, handle = input_widths(model)
    try:
        out, tr = run("generate", model, ids, am, (8, 4, 8), cache=cache, cache_interval=interval,
                      cfg_scale=cfg_scale, confidence_source="tps_prob")
    finally:
        handle.remove()
    length = out.shape[1]
    expected = []
    for start in (5, 9):  # prompt width 5, blocks of 4
        partial = {"prefix": length - start, "dual": 4, None: length}[cache]
        expected += [length if cache is None or i == 0 or (interval and i % interval == 0) else partial
                     for i in range(4)]
    assert widths == expected
    assert tr.forwards == len(tr.steps) == 8
    check_invariants(out, tr, ids, (8, 4, 8), remask=True)


# ---------------------------------------------------------------- invariants in every mode


def check_fast_invariants(out, trajectory, prompt, shape, remask: bool, parallel: bool, llada: bool) -> None:
    """Per step (from the trajectory): the block's mask count per row strictly falls while masks remain (>= 1 token
    per step) and stays 0 after; only the block changes; committed / remasked are exactly the changes and disjoint;
    kept tokens are never swapped; no re-masking in upstream mode; a parallel block stops at its first step that
    leaves no mask and never takes more than block_length steps (the fixed one takes steps / blocks); then no mask
    is left, the prompt is unchanged, and the cost counters hold."""
    gen_length, block_length, steps = shape
    batch, lp = prompt.shape
    blocks = gen_length // block_length
    prev = torch.cat([prompt, torch.full((batch, gen_length), MASK)], dim=1)
    per_block = Counter()
    for rec in trajectory.steps:
        block = slice(rec.start, rec.start + block_length)
        assert rec.start == lp + rec.block * block_length and rec.step == per_block[rec.block]
        now = rec.tokens
        was_masked, is_masked = prev[:, block] == MASK, now[:, block] == MASK
        before, after = was_masked.sum(-1), is_masked.sum(-1)
        assert torch.equal(rec.mask_count, after)
        assert torch.where(before > 0, after < before, after == 0).all(), (before, after)
        outside = torch.ones(now.shape[1], dtype=torch.bool)
        outside[block] = False
        assert torch.equal(now[:, outside], prev[:, outside])
        assert torch.equal(rec.committed, was_masked & ~is_masked)
        assert torch.equal(rec.remasked, ~was_masked & is_masked)
        assert not (rec.committed & rec.remasked).any()
        kept = ~was_masked & ~is_masked
        assert torch.equal(now[:, block][kept], prev[:, block][kept])
        assert remask or not rec.remasked.any()
        per_block[rec.block] += 1
        prev = now
    assert sorted(per_block) == list(range(blocks))
    if parallel:
        assert max(per_block.values()) <= block_length
        last = {rec.block: rec for rec in trajectory.steps}
        for rec in trajectory.steps:  # masks left after every step but the block's last
            assert bool(rec.mask_count.any()) == (rec is not last[rec.block])
    else:
        assert set(per_block.values()) == {steps // blocks}
    assert torch.equal(out, prev) and not (out == MASK).any() and torch.equal(out[:, :lp], prompt)
    if llada:
        assert len(trajectory.steps) == trajectory.forwards
    else:  # block decoding: the prompt, the steps, the appends of all blocks but the last
        assert trajectory.forwards == 1 + len(trajectory.steps) + blocks - 1
    assert trajectory.calls == 1 and trajectory.tokens == batch * gen_length and trajectory.seconds > 0
    assert trajectory.nfe == trajectory.forwards and trajectory.tokens_per_second > 0


RULES = {"fixed": {}, "threshold": dict(threshold=0.7), "factor": dict(factor=1.0)}
MODES = {"upstream": {}, "remask": dict(confidence_source="tps_prob")}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("cache", [None, *CACHES])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_trajectory_invariants_in_every_mode(sharp, rule, cache, mode):
    ids, am = padded_batch()
    shape = (12, 4, 6)
    out, tr = run("generate", sharp, ids, am, shape, cache=cache, temperature=0.5, **RULES[rule], **MODES[mode])
    check_fast_invariants(out, tr, ids, shape, remask=mode == "remask", parallel=rule != "fixed", llada=True)
    if rule == "fixed":
        check_invariants(out, tr, ids, shape, remask=mode == "remask")  # exactly B - k_i masks per step
    else:
        assert tr.forwards < shape[0]  # the rule took several tokens in some step


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_block_decoding_trajectory_invariants_with_the_parallel_rules(sharp, rule, mode):
    ids, am = padded_batch()
    shape = (12, 4, 6)
    out, tr = run("block_generate", sharp, ids, am, shape, temperature=0.5, **RULES[rule], **MODES[mode])
    check_fast_invariants(out, tr, ids, shape, remask=mode == "remask", parallel=rule != "fixed", llada=False)
    if rule != "fixed":  # the rule took several tokens of a row in some step
        assert any((rec.committed.sum(-1) > 1).any() for rec in tr.steps)


def test_trajectory_counters_sum_calls_without_recording_steps(sharp):
    """record_steps=False keeps no step but counts every call: forwards summed, nfe per call, tokens = B x G."""
    ids, am = padded_batch()
    tr = Trajectory(record_steps=False)
    for threshold in (None, 0.0):
        generate(sharp, ids, am, 6, 12, 4, mask_id=MASK, threshold=threshold, trajectory=tr)
    assert tr.steps == [] and tr.calls == 2 and tr.forwards == 6 + 3 and tr.nfe == 4.5
    assert tr.tokens == 2 * 2 * 12 and tr.seconds > 0 and tr.tokens_per_second == tr.tokens / tr.seconds
    assert re.fullmatch(r"NFE 4\.5, \d+\.\d tokens/s", tr.cost()), tr.cost()


# ---------------------------------------------------------------- settings plumbing


def bundle_of(model):
    return EvalModel(model=model, tokenizer=None, ups_head=None, mask_id=MASK, pad_id=PAD, eos_id=EOS, eot_id=EOT,
                     device=torch.device("cpu"))


def test_sampler_settings_pass_the_fast_decoding_fields_to_generate(sharp):
    ids, am = padded_batch()
    settings = SamplerSettings(steps=6, gen_length=12, block_length=4, temperature=0.5, confidence_source="tps_prob",
                               threshold=0.7, cache="dual", cache_interval=2)
    for s in (settings, settings.replace(threshold=None, factor=1.0, cache="prefix", cache_interval=None)):
        tr = Trajectory()
        torch.manual_seed(0)
        got = sample(bundle_of(sharp), ids, am, s, tr)
        torch.manual_seed(0)
        expected = generate(sharp, ids, am, 6, 12, 4, temperature=0.5, mask_id=MASK, confidence_source="tps_prob",
                            eos_id=EOS, eot_id=EOT, threshold=s.threshold, factor=s.factor, cache=s.cache,
                            cache_interval=s.cache_interval)
        assert torch.equal(got, expected) and tr.forwards < 12


def test_sample_refuses_a_cache_on_a_model_that_decodes_by_blocks():
    """A dual-stream model decodes by blocks by default (an exact cache): an approximate cache is refused there,
    and works once decoding 'llada' is asked for."""
    model = DualCacheToyMDM().eval()
    ids, am = padded_batch()
    settings = SamplerSettings(steps=6, gen_length=12, block_length=4, confidence_source="ups", cache="dual")
    with pytest.raises(ValueError, match=re.escape(BLOCK_CACHE_ERROR)):
        sample(bundle_of(model), ids, am, settings)
    with pytest.raises(ValueError, match=re.escape(BLOCK_CACHE_ERROR)):  # what the harness adapters check at load
        check_decoding(model, settings)
    check_decoding(model, settings.replace(decoding="llada"))
    assert not (sample(bundle_of(model), ids, am, settings.replace(decoding="llada")) == MASK).any()


# ---------------------------------------------------------------- bad input: one clear error each


BAD_GENERATE = [
    (dict(threshold=0.9, factor=1.0), "threshold=0.9 and factor=1.0 are two parallel-decoding rules; give one"),
    (dict(factor=0.0), r"factor must be > 0"),
    (dict(factor=-1.0), r"factor must be > 0"),
    (dict(threshold=math.nan), "threshold must be a finite number or None, got nan"),
    (dict(threshold=math.inf), "threshold must be a finite number or None, got inf"),
    (dict(factor=-math.inf), "factor must be a finite number or None, got -inf"),
    (dict(cache="nope"), r"unknown cache 'nope'; use one of \['prefix', 'dual'\] or None"),
    (dict(cache_interval=2), "cache_interval=2 refreshes a KV cache, but cache is None"),
    (dict(cache="dual", cache_interval=0), "cache_interval must be a positive integer"),
    (dict(threshold=0.9, confidence_source="ups", ups_temperature=1.0),
     "ups_temperature=1.0 ranks by random Plackett-Luce keys, which a threshold or factor cannot compare"),
]


@pytest.mark.parametrize("overrides,message", BAD_GENERATE, ids=lambda v: str(v)[:40])
def test_generate_and_settings_refuse_bad_fast_decoding_input(overrides, message):
    """Refused before any forward by generate(), and by SamplerSettings when built."""
    model = CacheToyMDM().eval()
    calls, handle = input_widths(model)
    try:
        with pytest.raises(ValueError, match=message):
            generate(model, padded_batch()[0], padded_batch()[1], 4, 8, 4, mask_id=MASK, **overrides)
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(ValueError, match=message):
        SamplerSettings(steps=4, gen_length=8, block_length=4, **overrides)


def test_cache_needs_a_model_taking_the_cache_arguments():
    model = ToyMDM().eval()
    assert not takes_cache(model) and takes_cache(CacheToyMDM())
    for cache in CACHES:
        with pytest.raises(ValueError, match=f"cache='{cache}' needs a model whose forward takes position_ids, "
                           "past_key_values, use_cache.*ToyMDM does not: use cache None"):
            generate(model, *padded_batch(), 4, 8, 4, mask_id=MASK, cache=cache)


def test_block_decoding_refuses_the_approximate_caches(sharp):
    with pytest.raises(ValueError, match=re.escape(BLOCK_CACHE_ERROR)):
        SamplerSettings(steps=4, gen_length=8, block_length=4, decoding="block", cache="prefix")
    for kw in (dict(cache="dual"), dict(cache_interval=1)):
        with pytest.raises(ValueError, match=re.escape(BLOCK_CACHE_ERROR)):
            block_generate(sharp, *padded_batch(), 4, 8, 4, mask_id=MASK, **kw)
    with pytest.raises(ValueError, match="two parallel-decoding rules"):
        block_generate(sharp, *padded_batch(), 4, 8, 4, mask_id=MASK, threshold=0.5, factor=1.0)


@pytest.mark.slow  # a subprocess: a few seconds of imports each
@pytest.mark.parametrize("flags,fragments", [
    (["--threshold", "0.9", "--factor", "1"], ["threshold=0.9 and factor=1.0", "give one"]),
    (["--cache", "nope"], ["--cache", "invalid choice: 'nope'"]),
], ids=["threshold+factor", "unknown-cache"])
def test_generate_cli_refuses_bad_fast_decoding_flags_in_one_line(flags, fragments, tmp_path):
    """Exit 2, one `error:` line, before any model loads (the --model path does not exist: loading it would fail
    with another message)."""
    result = run_cli(["generate.py", "--model", str(tmp_path / "never_loaded"), *flags])
    line = assert_user_error(result, *fragments)
    assert "never_loaded" not in line


@pytest.mark.parametrize("flags,message", [
    (["--factor", "0"], "factor must be > 0"),
    (["--threshold", "inf"], "threshold must be a finite number"),
    (["--cache_interval", "2"], "cache_interval=2 refreshes a KV cache, but cache is None"),
    (["--cache", "dual", "--cache_interval", "0"], "cache_interval must be a positive integer"),
    (["--decoding", "block", "--cache", "prefix"], "block decoding already caches exactly"),
])
def test_generate_cli_checks_the_fast_decoding_flags_before_loading(flags, message, tmp_path):
    import generate as cli

    with pytest.raises(ValueError, match=message):
        cli.main(["--model", str(tmp_path / "never_loaded")] + flags)


# ---------------------------------------------------------------- the embedded trained model


@pytest.fixture(scope="module")
def embedded():
    from remedi_patches.backbones import load_backbone
    from remedi_patches.embedded.task import format_prompt, make_split
    from remedi_patches.sampling import encode_texts

    bb = load_backbone(None)
    ids, am = encode_texts(bb.tokenizer, [format_prompt(p.question) for p in make_split(4, 0, "test")], False)
    assert am is not None and not bool(am.all())  # a left-padded batch
    return bb, ids, am


def embedded_decode(embedded, **kw):
    from remedi_patches.sampling import decode_answers

    bb, ids, am = embedded
    tr = Trajectory(record_steps=False)
    out = generate(bb.model, ids, am, steps=32, gen_length=32, block_length=16, mask_id=bb.mask_id, eos_id=bb.eos_id,
                   eot_id=bb.eot_id, trajectory=tr, **kw)
    assert not (out == bb.mask_id).any() and torch.equal(out[:, :ids.shape[1]], ids)
    return decode_answers(bb.tokenizer, out, ids.shape[1], [bb.eos_id]), tr


def test_embedded_model_decodes_finished_answers_with_the_approximate_caches(embedded):
    """The shipped tiny model with a cache refreshed once per block (interval None): finished answers ('#### N')
    with the NFE of the uncached fixed schedule."""
    _, exact = embedded_decode(embedded)
    assert exact.forwards == 32
    for cache in CACHES:
        answers, tr = embedded_decode(embedded, cache=cache)
        assert all(re.search(r"#### \d+", a) for a in answers), (cache, answers)
        assert tr.forwards == exact.forwards


def test_embedded_model_threshold_decodes_in_fewer_forwards(embedded):
    """Parallel threshold 0.9 (Fast-dLLM's value), alone and with the dual cache: NFE < gen_length, finished
    answers."""
    for cache in (None, "dual"):
        answers, tr = embedded_decode(embedded, threshold=0.9, cache=cache)
        assert tr.forwards < 32, cache
        assert all(re.search(r"#### \d+", a) for a in answers), (cache, answers)
