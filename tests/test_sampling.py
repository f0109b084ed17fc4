"""remedi_patches.sampling: SamplerSettings (checked before any model exists), the flags built from it, sample() on a
model bundle (token-equal to generate() with the same keywords), the shared prompt / answer helpers, and
remedi_patches.model_args (local paths checked before loading)."""
import argparse
import dataclasses
import inspect
import json

import pytest
import torch

from eval_gsm_math import read_predictions
from generate import generate as generate_from_script
from remedi_patches.backbones import EvalModel
from remedi_patches.block_decoding import block_generate
from remedi_patches.cli import ArgumentParser
from remedi_patches.model_args import ModelSpec, add_model_args, model_spec_from_args, resolve_device
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import (SamplerSettings, add_sampler_args, decode_answer, fit_prompt, generate,
                                     generate_answer_ids, left_pad, needs_ups_head, optional_value, sample,
                                     settings_from_args)
from remedi_patches.ups_head import UPSHead
from toy_models import D, EOS, EOT, MASK, PAD, PROMPT, SHORT, ToyMDM, padded_batch


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(5)
    return EvalModel(model=ToyMDM().eval(), tokenizer=None, ups_head=UPSHead(D, width=8).eval(), mask_id=MASK,
                     pad_id=PAD, eos_id=EOS, eot_id=EOT, device=torch.device("cpu"))


# ---------------------------------------------------------------- SamplerSettings


def test_defaults_are_generates_and_the_script_reexports_the_sampler():
    params = inspect.signature(generate).parameters
    block_params = inspect.signature(block_generate).parameters
    settings = SamplerSettings()
    assert settings.decoding is None  # by the model (sampling.decoding_of); every other field is a keyword of both
    for name, value in settings.generate_kwargs().items():
        assert value == params[name].default and name in block_params, name
    assert set(settings.generate_kwargs()) == {f.name for f in dataclasses.fields(SamplerSettings)} - {"decoding"}
    assert generate_from_script is generate
    assert SamplerSettings(4, 8, 8) == SamplerSettings(steps=4, gen_length=8, block_length=8)


BAD_SETTINGS = [
    (dict(gen_length=10, block_length=4), "gen_length=10 is not a multiple of block_length=4"),
    (dict(gen_length=8, block_length=4, steps=3), "not a multiple of the number of blocks 2"),
    (dict(gen_length=8, block_length=8, steps=16), "steps=16 > gen_length=8"),
    (dict(steps=0), "must be positive"),
    (dict(steps=4.0), "steps must be an integer"),
    (dict(temperature=-1.0), "must be >= 0"),
    (dict(cfg_scale="high"), "cfg_scale must be a number"),
    (dict(remasking="lowest"), "unknown remasking"),
    (dict(confidence_source="oracle"), "unknown confidence source"),
    (dict(remask=True), "remask=True needs a dynamic confidence_source"),
    (dict(remask="yes", confidence_source="ups"), "remask must be True, False or None"),
    (dict(logits_eos_inf=1), "logits_eos_inf must be True or False"),
]


@pytest.mark.parametrize("overrides,message", BAD_SETTINGS)
def test_bad_settings_are_refused_when_built(overrides, message):
    kw = dict(steps=4, gen_length=8, block_length=8)
    kw.update(overrides)
    with pytest.raises(ValueError, match=message):
        SamplerSettings(**kw)


def test_settings_are_frozen_and_replace_checks_again():
    settings = SamplerSettings(steps=4, gen_length=8, block_length=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps = 2
    assert settings.replace(steps=2).steps == 2 and settings.steps == 4
    with pytest.raises(ValueError, match="steps=16 > gen_length=8"):
        settings.replace(steps=16)
    assert not settings.remasks and settings.replace(confidence_source="ups").remasks
    assert not settings.replace(confidence_source="ups", remask=False).remasks


def test_generate_refuses_remask_in_upstream_mode(bundle):
    with pytest.raises(ValueError, match="remask=True needs a dynamic confidence_source"):
        generate(bundle.model, PROMPT, steps=4, gen_length=8, block_length=8, mask_id=MASK, remask=True)
    # remask=False is what upstream does anyway, and None is the default: both run
    out = generate(bundle.model, PROMPT, steps=4, gen_length=8, block_length=8, mask_id=MASK, remask=False)
    assert torch.equal(out, generate(bundle.model, PROMPT, steps=4, gen_length=8, block_length=8, mask_id=MASK))


# ---------------------------------------------------------------- flags from the dataclass


def test_flags_come_from_the_settings_with_per_cli_defaults():
    parser = ArgumentParser(prog="x")
    add_sampler_args(parser, defaults={"steps": 32, "gen_length": 32, "block_length": 32})
    help_text = parser.format_help()
    for f in dataclasses.fields(SamplerSettings):
        flag = "--no_remask" if f.name == "remask" else f"--{f.name}"
        assert flag in help_text, flag
    assert settings_from_args(parser.parse_args([])) == SamplerSettings(32, 32, 32)
    args = parser.parse_args(["--steps", "8", "--confidence_source", "ups", "--no_remask", "--temperature", "0.5",
                              "--logits_eos_inf"])
    assert settings_from_args(args) == SamplerSettings(8, 32, 32, temperature=0.5, logits_eos_inf=True,
                                                       confidence_source="ups", remask=False)
    with pytest.raises(ValueError, match="steps=64 > gen_length=32"):
        settings_from_args(parser.parse_args(["--steps", "64"]))


def test_excluded_flags_and_eos_gating():
    parser = argparse.ArgumentParser()
    add_sampler_args(parser, exclude=("confidence_source", "remask"))
    parser.add_argument("--eos_gating", action="store_true")
    assert "--confidence_source" not in parser.format_help() and "--no_remask" not in parser.format_help()
    settings = settings_from_args(parser.parse_args(["--eos_gating"]))
    assert settings.logits_eos_inf and settings.confidence_eos_eot_inf and settings.confidence_source is None


# ---------------------------------------------------------------- sample() on a bundle


@pytest.mark.parametrize("source,remask", [(None, None), ("tps_prob", None), ("ups", None), ("ups", False)])
@pytest.mark.parametrize("padded", [False, True])
def test_sample_is_generate_with_the_bundles_ids_and_head(bundle, source, remask, padded):
    ids, am = padded_batch() if padded else (PROMPT, None)
    settings = SamplerSettings(steps=6, gen_length=12, block_length=4, temperature=0.7, cfg_scale=0.5,
                               confidence_eos_eot_inf=True, confidence_source=source, remask=remask)
    torch.manual_seed(3)
    trajectory = Trajectory()
    got = sample(bundle, ids, am, settings, trajectory)
    torch.manual_seed(3)
    expected = generate(bundle.model, ids, am, steps=6, gen_length=12, block_length=4, temperature=0.7,
                        cfg_scale=0.5, confidence_eos_eot_inf=True, confidence_source=source, remask=remask,
                        mask_id=MASK, eos_id=EOS, eot_id=EOT, ups_head=bundle.ups_head)
    assert torch.equal(got, expected)
    assert len(trajectory.steps) == 6
    with pytest.raises(TypeError, match="SamplerSettings"):
        sample(bundle, ids, am, {"steps": 6})


def test_needs_ups_head(bundle):
    ups = SamplerSettings(4, 8, 8, confidence_source="ups")
    assert not needs_ups_head(bundle, ups)
    assert needs_ups_head(dataclasses.replace(bundle, ups_head=None), ups)
    assert not needs_ups_head(dataclasses.replace(bundle, ups_head=None), ups.replace(confidence_source="tps_prob"))


def test_answer_ids_of_a_batch_equal_each_prompt_alone(bundle):
    prompts = [PROMPT[0].tolist(), SHORT[0].tolist(), [11, 3]]
    settings = SamplerSettings(steps=4, gen_length=8, block_length=4, confidence_source="ups")
    batched = generate_answer_ids(bundle, prompts, settings, micro_batch=3)
    alone = generate_answer_ids(bundle, prompts, settings, micro_batch=1)
    assert batched == alone and len(batched) == 3
    for prompt, answer in zip(prompts, alone):
        out = sample(bundle, torch.tensor([prompt]), None, settings)[0, len(prompt):].tolist()
        stop = [i for i, t in enumerate(out) if t in (EOS, EOT)]
        assert answer == out[:stop[0] if stop else len(out)]
    with pytest.raises(ValueError, match="micro_batch"):
        generate_answer_ids(bundle, prompts, settings, micro_batch=0)


def test_prompt_helpers():
    ids, am = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and am.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_pad([[5], [6]], pad_id=0)[1] is None
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[5], []], pad_id=0)
    assert fit_prompt([1, 2, 3, 4], 2) == [3, 4] and fit_prompt([1], 2) == [1]
    with pytest.raises(ValueError, match="no room left"):
        fit_prompt([1], 0)

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"w{i}" for i in ids)

    assert decode_answer(Tok(), [1, 2, 3, 4], max_new_tokens=3, stop_words=["w3"]) == "w1 w2 "
    assert [optional_value(v) for v in (None, "", " None ", "x", 3)] == [None, None, None, "x", "3"]


# ---------------------------------------------------------------- model_args


def test_model_spec_reports_missing_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    ModelSpec(model_name="GSAI-ML/LLaDA-8B-Base", device="cpu").check()  # a hub name: left to the loader
    ModelSpec(model_name="embedded", device="cpu").check()
    for kw, flag in ((dict(model_name="out/model"), "--model: model path 'out/model'"),
                     (dict(tokenizer="./tok"), "--tokenizer"),
                     (dict(ups_head_path="head.safetensors"), "--ups_head head.safetensors: this local path"),
                     (dict(lora_path="lora"), "--lora_path lora: this local path")):
        with pytest.raises(FileNotFoundError, match=f"{flag}.*does not exist"):
            ModelSpec(device="cpu", **kw).check()
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelSpec(dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            ModelSpec(device="cuda").check()


def test_model_flags_keep_the_seed_names():
    parser = ArgumentParser(prog="x")
    add_model_args(parser)
    head = parser.parse_args(["--model_name", "org/m", "--ups_head", "."])
    assert model_spec_from_args(head).ups_head_path == "." and head.model_name == "org/m"
    assert parser.parse_args(["--model", "m"]).model_name == "m"
    assert "--ups_head PATH" in parser.format_help()


def test_device_auto_is_the_default_everywhere():
    parser = ArgumentParser(prog="x")
    add_model_args(parser)
    spec = model_spec_from_args(parser.parse_args([]))
    assert spec.device == "auto" and "auto = cuda" in parser.format_help()
    assert resolve_device("auto") == resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


# ---------------------------------------------------------------- predictions files


@pytest.mark.parametrize("line,message", [
    (b'{"index": 0', "bad.jsonl, line 2: not valid JSON"),
    (b"\xff\xfe{}", "bad.jsonl, line 2: not UTF-8"),
    (b"[1, 2]", "bad.jsonl, line 2: expected a JSON object"),
    (b'{"index": 0}', "bad.jsonl, line 2 lacks"),
])
def test_malformed_prediction_rows_name_file_and_line(tmp_path, line, message):
    good = {"index": 0, "source": "ups", "format": "gsm8k", "prompt": "q", "output": "#### 1", "extracted": "1",
            "gold": "1", "correct": True, "seconds": 0.1}
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n" + line + b"\n")
    with pytest.raises(ValueError, match=message):
        read_predictions(path)
    path.write_text(json.dumps({**good, "format": "mmlu"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl, line 1 has format 'mmlu'"):
        read_predictions(path)
