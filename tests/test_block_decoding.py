"""Block-diffusion decoding (remedi_patches.block_decoding, DESIGN.md 10): the KV-cached decode equals the uncached
block-causal reference token for token (every confidence source, batch 1 and a left-padded batch, temperature 0
and > 0, Plackett-Luce UPS draws); per-step invariants from the trajectory; EOS stop; a padded batch equals its rows
alone; the official inference's ranking (tps_logit) against a plain reference; Plackett-Luce draws have the
Plackett-Luce distribution; sampler settings, dispatch and clear errors."""
import itertools
import logging
import math

import pytest
import torch

from remedi_patches.backbones import EvalModel
from remedi_patches.block_decoding import block_causal_mask, block_generate
from remedi_patches.kv_cache import prompt_positions
from remedi_patches.confidence import CONFIDENCE_SOURCES
from remedi_patches.kv_cache import KVCache
from remedi_patches.modeling_wrappers import UPSModel, hidden_size_of
from remedi_patches.remasking import Trajectory, commit_schedule, plackett_luce_keys
from remedi_patches.sampling import SamplerSettings, decoding_of, generate, needs_ups_head, sample
from remedi_patches.ups_head import UPSHead
from toy_models import (D, EOS, EOT, MASK, PAD, PROMPT, SHORT, CacheToyMDM, DualCacheToyMDM, ToyMDM, check_invariants,
                        padded_batch)

pytestmark = pytest.mark.usefixtures("one_thread")
SOURCES = sorted(CONFIDENCE_SOURCES)  # ups, tps_prob, tps_logit, random, margin, entropy
SHAPES = [(12, 4, 6), (10, 5, 4)]  # (gen_length, block_length, steps): 3 blocks of k = 2, 4; 2 of k = 3, 5


@pytest.fixture(scope="module")
def toy():
    return DualCacheToyMDM().eval()


def decode(model, prompt, am, shape, cache=True, **kw):
    gen_length, block_length, steps = shape
    trajectory = Trajectory(keep_tokens=True)
    kw.setdefault("eos_id", EOS)
    out = block_generate(model, prompt, am, steps=steps, gen_length=gen_length, block_length=block_length,
                         mask_id=MASK, eot_id=EOT, trajectory=trajectory, kv_cache=cache, **kw)
    return out, trajectory


def both_paths(model, prompt, am, shape, seed=0, **kw):
    torch.manual_seed(seed)
    cached = decode(model, prompt, am, shape, cache=True, **kw)
    torch.manual_seed(seed)
    uncached = decode(model, prompt, am, shape, cache=False, **kw)
    return cached, uncached


# ---------------------------------------------------------------- cached == uncached


CASES = [dict(confidence_source=s, remask=r) for s in SOURCES for r in (True, False)] + [
    dict(confidence_source=None, remasking="low_confidence"), dict(confidence_source=None, remasking="random"),
    dict(confidence_source="ups", ups_temperature=1.2), dict(confidence_source="ups", ups_temperature=0.5,
                                                             remask=False),
    dict(confidence_source="tps_prob", confidence_eos_eot_inf=True, logits_eos_inf=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("batch", ["single", "padded"])
def test_cached_equals_uncached_block_causal_reference(toy, case, temperature, batch):
    prompt, am = (PROMPT, None) if batch == "single" else padded_batch()
    for shape in SHAPES:
        (out, tr), (ref, ref_tr) = both_paths(toy, prompt, am, shape, temperature=temperature, **case)
        assert torch.equal(out, ref)
        assert [torch.equal(a.committed, b.committed) and torch.equal(a.remasked, b.remasked)
                for a, b in zip(tr.steps, ref_tr.steps)] == [True] * len(ref_tr.steps)
        blocks = len({rec.block for rec in tr.steps})
        per_block = len(tr.steps) // blocks
        assert ref_tr.forwards == blocks * per_block  # the reference recomputes everything every step
        assert tr.forwards == 1 + blocks * per_block + (blocks - 1)  # prompt + steps + appends (not the last block)


def test_cached_equals_uncached_with_a_ups_head_on_a_cache_backbone():
    torch.manual_seed(3)
    head = UPSHead(D, width=8).eval()
    backbone = CacheToyMDM(seed=2).eval()
    ids, am = padded_batch()
    (out, _), (ref, _) = both_paths(backbone, ids, am, SHAPES[0], temperature=0.8, confidence_source="ups",
                                    ups_head=head, ups_temperature=1.0)
    assert torch.equal(out, ref)


def test_ups_model_passes_the_cache_arguments_to_the_backbone():
    torch.manual_seed(3)
    model = UPSModel(CacheToyMDM(seed=2).eval(), UPSHead(D, width=8).eval())
    ids, am = padded_batch()
    pos, real_len = prompt_positions(am, *ids.shape, ids.device)
    block = torch.full((2, 4), MASK)
    block_pos = real_len[:, None] + torch.arange(4)
    cache = KVCache()
    model(ids, am, position_ids=pos, past_key_values=cache, use_cache=True)
    assert len(cache) == ids.shape[1] and torch.equal(cache.key_mask, am.bool())
    cached = model(block, position_ids=block_pos, past_key_values=cache)
    group = torch.tensor([0] * ids.shape[1] + [1] * 4)
    real = torch.cat([am.bool(), torch.ones(2, 4, dtype=torch.bool)], dim=1)
    full = model(torch.cat([ids, block], 1), block_causal_mask(real, group), position_ids=torch.cat([pos, block_pos],
                                                                                                      1))
    torch.testing.assert_close(cached.logits, full.logits[:, -4:], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached.confidences, full.confidences[:, -4:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- invariants, EOS stop, padding


@pytest.mark.parametrize("source", SOURCES + [None])
@pytest.mark.parametrize("remask", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_invariants_every_step(toy, source, remask, temperature):
    ids, am = padded_batch()
    kw = dict(confidence_source=source, remask=remask if source else None, temperature=temperature, eos_id=None)
    for shape in SHAPES:
        torch.manual_seed(0)
        out, trajectory = decode(toy, ids, am, shape, **kw)
        assert len(trajectory.steps) == shape[2]
        check_invariants(out, trajectory, ids, shape, remask and source is not None)


class EosAt(DualCacheToyMDM):
    """The toy, but EOS is the argmax exactly at position id `at` and never a candidate elsewhere."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def forward(self, idx, attention_mask=None, *, position_ids=None, past_key_values=None, use_cache=False):
        out = super().forward(idx, attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                              use_cache=use_cache)
        out.logits[..., EOS] = torch.where(position_ids == self.at, 50.0, -torch.inf)
        return out


@pytest.mark.parametrize("cache", [True, False])
def test_stops_after_the_block_where_every_row_wrote_eos(cache):
    model = EosAt(8).eval()
    ids, am = padded_batch()  # real lengths 5 and 3: position 8 is in block 0 (row 0) and block 1 (row 1)
    shape = (12, 4, 6)  # 3 blocks of 4, 2 steps each
    out, trajectory = decode(model, ids, am, shape, cache=cache, confidence_source="ups")
    assert [rec.block for rec in trajectory.steps] == [0, 0, 1, 1]  # block 2 never decoded
    assert trajectory.forwards == (1 + 4 + 1 if cache else 4)  # no append after the stopping block
    lp = ids.shape[1]
    assert out[0, lp + 3] == EOS and (out[0, lp + 4:] == EOS).all()  # row 0: EOS block 0, then all EOS
    assert out[1, lp + 5] == EOS and (out[1, lp + 8:] == EOS).all()  # row 1: EOS block 1, then all EOS
    filled = torch.zeros_like(out, dtype=torch.bool)
    filled[0, lp + 4:] = filled[1, lp + 8:] = True
    check_invariants(out, trajectory, ids, shape, remask=True, eos_filled=filled)
    alone, alone_tr = decode(model, PROMPT, None, shape, cache=cache, confidence_source="ups")
    assert torch.equal(alone[0], out[0]) and len(alone_tr.steps) == 2  # row 0 alone stops after block 0


@pytest.mark.parametrize("source", ["ups", "tps_prob", "tps_logit", "margin", "entropy"])
@pytest.mark.parametrize("cache", [True, False])
def test_padded_batch_equals_rows_alone(toy, source, cache):
    ids, am = padded_batch()
    shape = SHAPES[1]
    out, _ = decode(toy, ids, am, shape, cache=cache, confidence_source=source)
    first, _ = decode(toy, PROMPT, None, shape, cache=cache, confidence_source=source)
    second, _ = decode(toy, SHORT, None, shape, cache=cache, confidence_source=source)
    assert torch.equal(out[0], first[0])
    assert torch.equal(out[1, 2:], second[0]) and (out[1, :2] == PAD).all()


# ---------------------------------------------------------------- the official inference's ranking


def official_style_decode(model, prompt, gen_length, block_length, steps):
    """The official RemeDi inference's rule, written out for one unpadded prompt (reference/remedi_official.md C)
    with the LLaDA k_i schedule: per step the whole context recomputed, x0 = argmax at masked positions, score =
    raw TPS logit of x0, keep the top k_i of the block, mask the rest."""
    lp = prompt.shape[1]
    x = prompt.clone()
    per_block = steps // (gen_length // block_length)
    for _ in range(gen_length // block_length):
        cur = torch.full((1, block_length), MASK)
        for k in commit_schedule(block_length, per_block):
            full = torch.cat([x, cur], dim=1)
            n = full.shape[1]
            allowed = torch.zeros(n, n, dtype=torch.bool)
            for q in range(n):  # prompt -> prompt; block j -> prompt + blocks <= j
                allowed[q, :lp if q < lp else lp + ((q - lp) // block_length + 1) * block_length] = True
            logits = model(full, allowed[None, None], position_ids=torch.arange(n)[None]).logits[:, -block_length:]
            x0 = torch.where(cur == MASK, logits.argmax(-1), cur)
            score = logits.gather(-1, x0[..., None])[..., 0]
            keep = score[0].topk(k).indices
            cur = torch.full_like(cur, MASK)
            cur[0, keep] = x0[0, keep]
        x = torch.cat([x, cur], dim=1)
    return x


@pytest.mark.parametrize("shape", SHAPES)
def test_tps_logit_reproduces_the_official_ranking(toy, shape):
    gen_length, block_length, steps = shape
    out, _ = decode(toy, PROMPT, None, shape, confidence_source="tps_logit", eos_id=None)
    assert torch.equal(out, official_style_decode(toy, PROMPT, gen_length, block_length, steps))


def test_tps_logit_ranks_by_the_raw_logit_not_the_probability():
    from remedi_patches.confidence import ConfidenceInputs, get_confidence_source

    logits = torch.tensor([[[5.0, 4.9, 4.9], [3.0, -9.0, -9.0]]])  # row 0: higher logit, lower probability
    inp = ConfidenceInputs(logits, torch.tensor([[0, 0]]), None, 2, slice(0, 2))
    assert get_confidence_source("tps_logit")(inp).tolist() == [[5.0, 3.0]]
    prob = get_confidence_source("tps_prob")(inp)
    assert prob[0, 0] < prob[0, 1]


# ---------------------------------------------------------------- Plackett-Luce draws


def plackett_luce_probability(order, weights):
    """P(first len(order) draws are `order`) under Plackett-Luce with these weights."""
    left, p = sum(weights), 1.0
    for i in order:
        p *= weights[i] / left
        left -= weights[i]
    return p


def test_plackett_luce_keys_draw_the_plackett_luce_distribution():
    scores, tau, draws = torch.tensor([1.0, 0.0, -0.5, 0.7]), 1.2, 40000
    weights = (scores / tau).softmax(-1).tolist()
    torch.manual_seed(0)
    top = plackett_luce_keys(scores.expand(draws, 4), tau).topk(2, dim=-1).indices  # ordered top-2
    for order in itertools.permutations(range(4), 2):
        expected = plackett_luce_probability(order, weights)
        seen = ((top[:, 0] == order[0]) & (top[:, 1] == order[1])).double().mean().item()
        assert abs(seen - expected) < 4 * math.sqrt(expected * (1 - expected) / draws), order
    # restricted to a subset (the masked positions when remask=False): Plackett-Luce of the subset's weights
    subset = torch.tensor([True, False, True, True])
    first = plackett_luce_keys(scores.expand(draws, 4), tau).masked_fill(~subset, -torch.inf).argmax(-1)
    sub_weights = torch.tensor(weights) * subset
    for i in (0, 2, 3):
        expected = (sub_weights[i] / sub_weights.sum()).item()
        assert abs((first == i).double().mean().item() - expected) < 4 * math.sqrt(expected / draws)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        plackett_luce_keys(scores, 0.0)


def test_plackett_luce_ranking_is_random_and_greedy_without_temperature(toy):
    shape = (8, 8, 4)
    greedy = [decode(toy, PROMPT, None, shape, confidence_source="ups", eos_id=None)[0] for _ in range(2)]
    assert torch.equal(*greedy)
    torch.manual_seed(0)
    drawn = {tuple(decode(toy, PROMPT, None, shape, confidence_source="ups", ups_temperature=2.0,
                          eos_id=None)[1].steps[0].committed[0].tolist()) for _ in range(12)}
    assert len(drawn) > 1  # the first step's kept positions vary between draws


def test_eos_candidates_rank_last_under_plackett_luce(toy):
    model = EosAt(7).eval()  # PROMPT has 5 tokens: position 7 is the third answer position
    torch.manual_seed(0)
    for _ in range(10):
        out, trajectory = decode(model, PROMPT, None, (4, 4, 4), confidence_source="ups", ups_temperature=5.0,
                                 confidence_eos_eot_inf=True, eos_id=EOS)
        assert not trajectory.steps[2].committed[0, 2] or trajectory.steps[2].mask_count[0] == 0
        assert out[0, 7] == EOS  # committed by the last step only (every other candidate went first)
        assert all(rec.tokens[0, 7] == MASK for rec in trajectory.steps[:3])


# ---------------------------------------------------------------- settings, dispatch, errors


def bundle_of(model, head=None, eos_id=EOS):
    return EvalModel(model=model, tokenizer=None, ups_head=head, mask_id=MASK, pad_id=PAD, eos_id=eos_id,
                     eot_id=EOT, device=torch.device("cpu"))


def test_decoding_follows_the_model_unless_given(toy):
    single = CacheToyMDM().eval()
    assert decoding_of(toy) == "block" and decoding_of(single) == "llada" and decoding_of(single, "block") == "block"
    ids, am = padded_batch()
    settings = SamplerSettings(steps=6, gen_length=12, block_length=4, confidence_source="ups")
    torch.manual_seed(0)
    by_model = sample(bundle_of(toy), ids, am, settings)
    expected, _ = decode(toy, ids, am, (12, 4, 6), confidence_source="ups")
    assert torch.equal(by_model, expected)
    assert torch.equal(sample(bundle_of(single), ids, am, settings),
                       generate(single, ids, am, 6, 12, 4, mask_id=MASK, confidence_source="ups", eos_id=EOS,
                                eot_id=EOT))
    assert torch.equal(sample(bundle_of(single), ids, am, settings.replace(decoding="block")),
                       decode(single, ids, am, (12, 4, 6), confidence_source="ups")[0])
    assert torch.equal(sample(bundle_of(toy), ids, am, settings.replace(decoding="llada")),
                       generate(toy, ids, am, 6, 12, 4, mask_id=MASK, confidence_source="ups", eos_id=EOS,
                                eot_id=EOT))


def test_ups_temperature_works_in_llada_decoding_too():
    single = CacheToyMDM().eval()
    kw = dict(steps=4, gen_length=8, block_length=8, mask_id=MASK, confidence_source="ups")
    torch.manual_seed(0)
    drawn = {tuple(generate(single, PROMPT, ups_temperature=3.0, **kw)[0].tolist()) for _ in range(8)}
    assert len(drawn) > 1 and generate(single, PROMPT, **kw).equal(generate(single, PROMPT, **kw))


def test_a_model_with_its_own_ups_stream_refuses_a_ups_head(toy):
    head = UPSHead(D, width=8).eval()
    settings = SamplerSettings(steps=4, gen_length=8, block_length=4, confidence_source="ups")
    for decoding in ("block", "llada"):
        with pytest.raises(ValueError, match="has its own UPS stream.*drop ups_head"):
            sample(bundle_of(toy, head), PROMPT, None, settings.replace(decoding=decoding))
    with pytest.raises(ValueError, match="has its own UPS stream"):
        UPSModel(toy, head)
    assert not needs_ups_head(bundle_of(toy), settings)  # its own stream gives the UPS
    assert needs_ups_head(bundle_of(CacheToyMDM()), settings)


BAD = [
    (dict(decoding="blocks"), "unknown decoding 'blocks'"),
    (dict(decoding="block", cfg_scale=1.0), "block decoding does not implement classifier-free guidance"),
    (dict(ups_temperature=1.0, confidence_source="tps_prob"), "ups_temperature=1.0 samples the ranking"),
    (dict(ups_temperature=1.0), "confidence_source is None"),
    (dict(ups_temperature=-1.0, confidence_source="ups"), "must be >= 0"),
    (dict(ups_temperature="hot", confidence_source="ups"), "ups_temperature must be a number"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_settings_are_refused_when_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        SamplerSettings(steps=4, gen_length=8, block_length=4, **overrides)


def test_block_generate_refuses_what_it_cannot_do(toy):
    with pytest.raises(ValueError, match="classifier-free guidance"):
        decode(toy, PROMPT, None, (8, 4, 4), cfg_scale=1.0)
    with pytest.raises(ValueError, match="forward takes position_ids, past_key_values, use_cache.*--decoding llada"):
        decode(ToyMDM().eval(), PROMPT, None, (8, 4, 4), confidence_source="tps_prob")
    with pytest.raises(ValueError, match="not a multiple of block_length"):
        decode(toy, PROMPT, None, (10, 4, 5))
    with pytest.raises(ValueError, match="prompt contains the mask id"):
        decode(toy, torch.tensor([[3, MASK]]), None, (8, 4, 4))


# ---------------------------------------------------------------- the project's models


def smdm_encoder():
    from lit_gpt.config import Config
    from lit_gpt.model import TransEncoder

    torch.manual_seed(0)
    config = Config.from_name("Diff_LLaMA_tiny", vocab_size=V_SMDM, padding_multiple=1, n_embd=32, n_head=2,
                              intermediate_size=64, n_layer=2, block_size=64)
    return TransEncoder(config).eval(), config.mask_id


def llada():
    from test_llada_model import TINY, tiny_model

    return tiny_model(), TINY["mask_token_id"]


def remedi_llada():
    from test_remedi_llada import TINY_REMEDI, tiny_remedi

    return tiny_remedi(), TINY_REMEDI["mask_token_id"]  # non-zero feedback: the UPS stream moves the logits


def remedi_smdm():
    from lit_gpt.dual_stream import remedi_from_backbone

    backbone, mask_id = smdm_encoder()
    model = remedi_from_backbone(backbone, ups_positions=[0, 1], ups_init="smdm").eval()
    with torch.no_grad():
        for linear in model.ups.feedback:  # non-zero feedback: the UPS stream moves the logits
            linear.weight.normal_(std=0.1)
    return model, mask_id


V_SMDM = 48
REAL_MODELS = {"smdm": smdm_encoder, "llada": llada, "remedi_llada": remedi_llada, "remedi_smdm": remedi_smdm}


def real_prompts(mask_id):
    torch.manual_seed(1)
    ids = torch.randint(0, mask_id, (2, 6))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    return ids, am


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
@pytest.mark.parametrize("kw", [dict(confidence_source="tps_logit"), dict(confidence_source="ups", ups_temperature=1.2,
                                                                          temperature=0.9)],
                         ids=["tps_logit", "ups-sampled"])
def test_cached_equals_uncached_on_the_project_models(name, kw):
    model, mask_id = REAL_MODELS[name]()
    head = None
    if kw["confidence_source"] == "ups" and not getattr(model, "has_ups_stream", False):
        head = UPSHead(hidden_size_of(model), width=8).eval()
    for prompt, am in (real_prompts(mask_id)[0][:1], None), real_prompts(mask_id):
        outs = []
        for cache in (True, False):
            torch.manual_seed(7)
            outs.append(block_generate(model, prompt, am, steps=8, gen_length=16, block_length=8, mask_id=mask_id,
                                       eos_id=None, ups_head=head, kv_cache=cache, **kw))
        assert torch.equal(*outs)


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_padded_batch_equals_rows_alone_on_the_project_models(name):
    model, mask_id = REAL_MODELS[name]()
    ids, am = real_prompts(mask_id)
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=mask_id, eos_id=None, confidence_source="tps_prob")
    assert decoding_of(model) == ("block" if name.startswith("remedi") else "llada")  # dual-stream: block diffusion
    if name.startswith("remedi"):
        kw["confidence_source"] = "ups"  # its own UPS stream
    out = block_generate(model, ids, am, **kw)
    assert torch.equal(out[0], block_generate(model, ids[:1], None, **kw)[0])
    assert torch.equal(out[1, 3:], block_generate(model, ids[1:, 3:], None, **kw)[0])


# ---------------------------------------------------------------- the command lines


def model_flags(tiny):
    return ["--model", str(tiny), "--ups_head", str(tiny / "ups_head.safetensors"), "--device", "cpu"]


SMALL = ["--steps", "8", "--gen_length", "16", "--block_length", "8"]


def test_generate_cli_decodes_by_blocks_with_the_new_flags(tiny, capsys):
    import generate as cli
    from remedi_patches.backbones import load_backbone
    from remedi_patches.modeling_wrappers import load_ups_head
    from remedi_patches.sampling import decode_answers, encode_prompts

    answers = cli.main(model_flags(tiny) + SMALL + ["--decoding", "block", "--confidence_source", "ups",
                                                    "--ups_temperature", "1.5", "--temperature", "0.5",
                                                    "--prompt", "Tom has 3 pens."])
    assert "decoding: block" in capsys.readouterr().out
    bb = load_backbone(str(tiny))
    ids, am = encode_prompts(bb.tokenizer, ["Tom has 3 pens."])
    head = load_ups_head(tiny)[0]  # (building a head draws from the RNG: before the seed)
    torch.manual_seed(0)
    out = block_generate(bb.model, ids, am, steps=8, gen_length=16, block_length=8, temperature=0.5,
                         mask_id=bb.mask_id, confidence_source="ups", ups_head=head,
                         ups_temperature=1.5, eos_id=bb.eos_id, eot_id=bb.eot_id)
    assert answers == decode_answers(bb.tokenizer, out, ids.shape[1], [bb.eos_id, bb.eot_id])
    cli.main(model_flags(tiny) + SMALL + ["--prompt", "Tom has 3 pens."])
    assert "decoding: llada" in capsys.readouterr().out  # a single-stream model keeps LLaDA-style decoding


@pytest.mark.parametrize("flags,message", [
    (["--decoding", "block", "--cfg_scale", "1"], "block decoding does not implement classifier-free guidance"),
    (["--ups_temperature", "1"], "samples the ranking from the UPS confidences"),
])
def test_generate_cli_refuses_bad_new_flags_before_loading(flags, message, tmp_path):
    import generate as cli

    with pytest.raises(ValueError, match=message):
        cli.main(["--model", str(tmp_path / "never_loaded")] + flags)


def test_generate_cli_offers_the_two_decodings(capsys):
    import generate as cli

    with pytest.raises(SystemExit):
        cli.main(["--decoding", "fast"])
    err = capsys.readouterr().err
    assert "--decoding: invalid choice: 'fast'" in err and "llada" in err and "block" in err


def test_eval_cli_ups_temperature_applies_to_the_ups_runs(tiny, tmp_path):
    import eval_gsm_math as E

    args = E.build_parser().parse_args(model_flags(tiny) + SMALL + ["--confidence_sources", "ups", "tps_prob",
                                                                   "--ups_temperature", "1.2", "--decoding", "block"])
    runs, _ = E.runs_and_settings(args)
    assert [(r.label, r.ups_temperature) for r in runs] == [("ups", 1.2), ("tps_prob", 0.0)]
    args = E.build_parser().parse_args(model_flags(tiny) + ["--confidence_sources", "tps_prob",
                                                            "--ups_temperature", "1.2"])
    with pytest.raises(ValueError, match="--ups_temperature 1.2 applies to the 'ups' source"):
        E.runs_and_settings(args)
    summary = E.main(model_flags(tiny) + SMALL + ["--confidence_sources", "ups", "tps_logit", "--ups_temperature",
                                                  "1.2", "--decoding", "block", "--max_samples", "2",
                                                  "--out_dir", str(tmp_path), "--no_progress"])
    assert [r["source"] for r in summary["results"]] == ["ups", "tps_logit"]


def test_eval_cli_defaults_and_checks_follow_the_loaded_models_ups(tiny):
    import eval_gsm_math as E

    args = E.build_parser().parse_args(["--model", str(tiny), "--device", "cpu"] + SMALL)
    assert [r.label for r in E.runs_and_settings(args, 128, ups=True)[0]] == ["ups", "tps_prob", "random"]
    assert [r.label for r in E.runs_and_settings(args, 128, ups=False)[0]] == ["tps_prob", "random"]
    args.confidence_sources = ["ups"]
    E.runs_and_settings(args)  # before loading: the model may have its own UPS stream
    with pytest.raises(ValueError, match="needs a UPS: pass --ups_head.*its own UPS stream"):
        E.runs_and_settings(args, 128, ups=False)


def test_bench_prints_the_side_by_side_table(capsys):
    import bench_block_decoding as bench

    rows = bench.main(["--n_layer", "2", "--n_embd", "32", "--ups_blocks", "1", "--vocab", "64", "--prompt_len", "8",
                       "--gen_length", "16", "--block_length", "8", "--steps", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert out.startswith("command: python bench/bench_block_decoding.py --n_layer 2")
    assert [(r["model"], r["run"], r["nfe"]) for r in rows] == [
        (model, run, nfe) for model in ("remedi_llada", "embedded")
        for run, nfe in (("block+cache", 1 + 8 + 1), ("block", 8), ("llada", 8))]  # 2 blocks of 4 steps
    assert out.count("| remedi_llada (") == 3 and out.count("| embedded (") == 3


@pytest.fixture(scope="module")
def tiny_remedi_dir(tmp_path_factory, data_dir):
    from eval_fixtures import tiny_llada_dir

    return tiny_llada_dir(tmp_path_factory.mktemp("remedi"), data_dir, ups_positions=[0])


def test_generate_cli_decodes_a_dual_stream_folder_by_blocks_with_its_own_ups(tiny_remedi_dir, tiny, capsys):
    import generate as cli
    from remedi_patches.backbones import load_backbone
    from remedi_patches.sampling import decode_answers, encode_prompts

    flags = ["--model", str(tiny_remedi_dir), "--device", "cpu", "--steps", "8", "--gen_length", "16",
             "--block_length", "8", "--confidence_source", "ups", "--ups_temperature", "1.2", "--prompt",
             "How many pens?"]
    answers = cli.main(flags)
    assert "decoding: block" in capsys.readouterr().out
    bb = load_backbone(str(tiny_remedi_dir))
    ids, am = encode_prompts(bb.tokenizer, ["How many pens?"])
    torch.manual_seed(0)
    out = block_generate(bb.model, ids, am, steps=8, gen_length=16, block_length=8, mask_id=bb.mask_id,
                         confidence_source="ups", ups_temperature=1.2, eos_id=bb.eos_id, eot_id=bb.eot_id)
    assert answers == decode_answers(bb.tokenizer, out, ids.shape[1], [bb.eos_id, bb.eot_id]) and answers[0]
    with pytest.raises(ValueError, match="own UPS stream"):
        cli.main(flags + ["--ups_head", str(tiny / "ups_head.safetensors")])


def test_generate_cli_says_how_to_rank_a_dual_stream_model_by_its_ups(tiny_remedi_dir, caplog):
    """No --confidence_source on a model with its own UPS stream: LLaDA's rule, with one warning naming the flag."""
    import generate as cli

    with caplog.at_level(logging.WARNING, logger="generate"):
        cli.main(["--model", str(tiny_remedi_dir), "--device", "cpu", "--gen_length", "8", "--prompt", "How many?"])
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "generate"]
    assert "has its own UPS stream" in warning and "--confidence_source ups" in warning
