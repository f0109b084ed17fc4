"""The sampling methods of LLaDA's training README (remedi_patches.sampling.generate, `method=`): fixed_length,
semi_autoregressive_padding (upstream) and semi_autoregressive_origin (the answer grows a block at a time until
EOS), through generate(), SamplerSettings, block decoding and the command line."""
from types import SimpleNamespace

import pytest
import torch

from generate import build_parser
from remedi_patches.block_decoding import block_generate
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import (SEMI_AR_ORIGIN, SamplerSettings, check_decoding, generate, settings_from_args)
from remedi_patches.ups_head import UPSHead
from toy_models import D, EOS, MASK, PROMPT, CacheToyMDM, DualCacheToyMDM, ToyMDM, padded_batch

ORIGIN = dict(method=SEMI_AR_ORIGIN, mask_id=MASK, eos_id=EOS)


class EOSBias(torch.nn.Module):
    """ToyMDM with the EOS logit shifted per row (bias (B,)): +big writes EOS everywhere, -big never."""

    def __init__(self, bias: list[float]):
        super().__init__()
        self.inner, self.bias = ToyMDM().eval(), torch.tensor(bias)

    def forward(self, idx, attention_mask=None):
        logits = self.inner(idx, attention_mask).logits.clone()
        logits[..., EOS] += self.bias[:, None]
        return SimpleNamespace(logits=logits)


def grow_by_blocks(model, prompt, attention_mask, steps, gen_length, block_length, **kw):
    """The reference of origin decoding without EOS: one one-block generate() call per block on the text so far."""
    x, am = prompt, attention_mask
    for _ in range(gen_length // block_length):
        x = generate(model, x, am, steps=steps * block_length // gen_length, gen_length=block_length,
                     block_length=block_length, mask_id=MASK, **kw)
        am = None if am is None else torch.cat([am, am.new_ones(am.shape[0], block_length)], dim=1)
    return x


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kw", [{}, dict(confidence_source="ups"), dict(confidence_source="tps_prob", remask=False),
                                dict(temperature=1.0), dict(threshold=0.2)])
def test_origin_without_eos_is_one_block_call_after_another(padded, kw):
    """No EOS written (logits_eos_inf): origin decoding equals growing the answer by one-block calls, draw for draw.
    (Not under CFG: its unconditional copy masks the prompt alone, where a later call's prompt holds the answer.)"""
    model = ToyMDM().eval()
    ids, am = padded_batch() if padded else (PROMPT, None)
    if kw.get("confidence_source") == "ups":
        torch.manual_seed(3)
        kw = dict(kw, ups_head=UPSHead(D, width=8).eval())
    torch.manual_seed(0)
    out = generate(model, ids, am, steps=6, gen_length=12, block_length=4, logits_eos_inf=True, **ORIGIN, **kw)
    torch.manual_seed(0)
    ref = grow_by_blocks(model, ids, am, 6, 12, 4, logits_eos_inf=True, eos_id=EOS, **kw)
    assert torch.equal(out, ref)
    assert not (out[:, ids.shape[1]:] == EOS).any()


@pytest.mark.parametrize("kw", [{}, dict(confidence_source="ups"), dict(temperature=1.0), dict(cfg_scale=1.0)])
def test_origin_fills_like_fixed_length_when_the_answer_fills_the_length(kw):
    """One block: origin reads what fixed-length decoding reads, so both give the same tokens."""
    model = ToyMDM().eval()
    if kw:
        torch.manual_seed(3)
        kw = dict(kw, ups_head=UPSHead(D, width=8).eval()) if "confidence_source" in kw else kw
    outs = []
    for method in ("fixed_length", SEMI_AR_ORIGIN, None):
        torch.manual_seed(0)
        outs.append(generate(model, PROMPT, steps=4, gen_length=8, block_length=8, mask_id=MASK, eos_id=EOS,
                             logits_eos_inf=True, method=method, **kw))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_origin_differs_from_padding_where_the_future_masks_matter():
    """With several blocks the padding method lets the model read the masks still to come; origin does not."""
    model = ToyMDM().eval()
    padding = generate(model, PROMPT, steps=12, gen_length=12, block_length=4, mask_id=MASK, eos_id=EOS,
                       logits_eos_inf=True)
    origin = generate(model, PROMPT, steps=12, gen_length=12, block_length=4, logits_eos_inf=True, **ORIGIN)
    assert not torch.equal(padding, origin)


def test_origin_stops_after_the_block_where_every_row_wrote_eos():
    model = EOSBias([50.0, 50.0])
    trajectory = Trajectory(keep_tokens=True)
    out = generate(model, PROMPT.repeat(2, 1), steps=12, gen_length=12, block_length=4, trajectory=trajectory,
                   **ORIGIN)
    assert len(trajectory.steps) == 4 and trajectory.forwards == 4  # the first block's 4 steps, nothing more
    assert (out[:, PROMPT.shape[1]:] == EOS).all()
    assert trajectory.steps[-1].tokens.shape == out.shape  # snapshots keep the full shape


def test_origin_rows_that_end_early_get_eos_while_the_others_grow():
    model = EOSBias([50.0, -50.0])  # row 0 writes EOS at once, row 1 never
    trajectory = Trajectory()
    out = generate(model, PROMPT.repeat(2, 1), steps=12, gen_length=12, block_length=4, trajectory=trajectory,
                   **ORIGIN)
    lp = PROMPT.shape[1]
    assert trajectory.forwards == 12  # every block decoded for row 1
    assert (out[0, lp:] == EOS).all() and not (out[1, lp:] == EOS).any() and not (out == MASK).any()


def test_origin_over_an_exact_cache_equals_no_cache():
    """The dual cache refreshed at every step is exact; at the end of the text it has no suffix to cache."""
    model = CacheToyMDM().eval()
    ref = generate(model, PROMPT, steps=8, gen_length=8, block_length=4, logits_eos_inf=True, **ORIGIN)
    for cache in ("prefix", "dual"):
        out = generate(model, PROMPT, steps=8, gen_length=8, block_length=4, logits_eos_inf=True, cache=cache,
                       cache_interval=1, **ORIGIN)
        assert torch.equal(out, ref), cache


def test_method_settings_and_refusals():
    with pytest.raises(ValueError, match="fixed_length decodes the answer as one block"):
        SamplerSettings(steps=8, gen_length=8, block_length=4, method="fixed_length")
    with pytest.raises(ValueError, match="unknown method"):
        generate(ToyMDM(), PROMPT, steps=4, gen_length=8, block_length=8, mask_id=MASK, method="origin")
    with pytest.raises(ValueError, match="needs eos_id"):
        generate(ToyMDM(), PROMPT, steps=4, gen_length=8, block_length=8, mask_id=MASK, eos_id=None,
                 method=SEMI_AR_ORIGIN)
    with pytest.raises(ValueError, match="semi_autoregressive_origin by construction"):
        SamplerSettings(steps=8, gen_length=8, block_length=8, decoding="block", method="fixed_length")
    with pytest.raises(ValueError, match="semi_autoregressive_origin by construction"):
        block_generate(CacheToyMDM(), PROMPT, steps=4, gen_length=8, block_length=4, mask_id=MASK,
                       method="semi_autoregressive_padding")
    with pytest.raises(ValueError, match="decodes by blocks by default"):
        check_decoding(DualCacheToyMDM(), SamplerSettings(steps=4, gen_length=8, block_length=4,
                                                          method="semi_autoregressive_padding"))
    # block decoding is origin by construction: the method is accepted and changes nothing
    model = CacheToyMDM().eval()
    kw = dict(steps=8, gen_length=8, block_length=4, mask_id=MASK, eos_id=EOS)
    assert torch.equal(block_generate(model, PROMPT, method=SEMI_AR_ORIGIN, **kw), block_generate(model, PROMPT, **kw))


def test_cli_method_flag_and_fixed_length_default_block():
    parser = build_parser()
    settings = settings_from_args(parser.parse_args(["--method", "fixed_length", "--gen_length", "64"]), window=512)
    assert (settings.gen_length, settings.block_length, settings.steps) == (64, 64, 64)
    settings = settings_from_args(parser.parse_args(["--method", SEMI_AR_ORIGIN]), window=512)
    assert settings.method == SEMI_AR_ORIGIN and settings.block_length == 32
    with pytest.raises(ValueError, match="fixed_length decodes the answer as one block"):
        settings_from_args(parser.parse_args(["--method", "fixed_length", "--gen_length", "64", "--block_length",
                                              "32"]))


def test_generate_cli_decodes_by_origin_and_says_so(tiny, capsys):
    import generate as script

    flags = ["--model", str(tiny), "--device", "cpu", "--steps", "4", "--gen_length", "8", "--block_length", "4",
             "--prompt", "Tom has 3 pens.", "--method", SEMI_AR_ORIGIN]
    answers = script.main(flags)
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("(steps 4, gen_length 8, block_length 4) decoding: llada, method: "
                             "semi_autoregressive_origin | NFE "), header
    assert int(header.split("NFE ")[1].split(",")[0]) in (2, 4)  # one block, or two when no EOS came first
    assert len(answers) == 1
