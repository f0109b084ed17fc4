"""Every sampling entry point works with its defaults on the embedded model (issue 10): sampler lengths from the
model's window (remedi_patches.sampling.default_lengths), prompts longer than the room left-cropped with one
warning or a gen_length that cannot fit refused in one line (PromptWindow), and one prompt rule (prompt_texts):
`infer_compare.py --prompt P` answers exactly as `generate.py --prompt P` with the same flags and seed."""
import json
import logging

import pytest
import torch

import eval_gsm_math as E
import generate
import infer_compare
from cli_helpers import run_cli
from remedi_patches.cli import ArgumentParser
from remedi_patches.sampling import (LENGTH_DEFAULTS, PromptWindow, SamplerSettings, add_sampler_args,
                                     check_fits, check_sampler_args, default_lengths, prompt_texts,
                                     settings_from_args, uses_chat)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on the 2 shared CI cores
CROP = "prompts are longer than the"
MIA = ("Mia has 14 shells. She finds 7 more. She gives away 9. She doubles them. How many shells does Mia have now?")


# ---------------------------------------------------------------- the rules (no model)


def test_default_lengths_fit_the_window_and_keep_explicit_values():
    lengths = lambda steps, gen, block: {"steps": steps, "gen_length": gen, "block_length": block}  # noqa: E731
    assert default_lengths(128) == lengths(32, 32, 32)  # the embedded model: 96 tokens stay for the prompt
    assert default_lengths(4096) == default_lengths(None) == lengths(128, 128, 32)  # LLaDA-8B: as upstream
    assert default_lengths(512) == lengths(128, 128, 32)
    assert default_lengths(100) == lengths(25, 25, 25)  # shorter than one block of 32: one block
    assert default_lengths(128, gen_length=48) == lengths(48, 48, 48)  # 32 does not divide 48
    assert default_lengths(128, gen_length=64) == lengths(64, 64, 32)
    assert default_lengths(128, block_length=8) == lengths(32, 32, 8)
    assert default_lengths(300, block_length=24) == lengths(72, 72, 24)  # 75 rounded down to whole blocks
    assert default_lengths(128, steps=8, gen_length=16, block_length=4) == lengths(8, 16, 4)  # kept exactly
    assert check_fits(32, 128) == 96 and check_fits(4096, None) is None
    with pytest.raises(ValueError, match="--gen_length 128 does not fit the model's window of 128 tokens"):
        check_fits(128, 128)


def test_flags_are_checked_before_loading_and_defaults_come_after():
    parser = ArgumentParser(prog="x")
    add_sampler_args(parser, defaults=LENGTH_DEFAULTS)
    args = lambda *flags: parser.parse_args(list(flags))  # noqa: E731
    check_sampler_args(args("--steps", "7"))  # may fit once the window is known: not refused before loading
    assert settings_from_args(args("--steps", "7"), 128) == SamplerSettings(7, 32, 32)
    assert settings_from_args(args(), 4096) == SamplerSettings(128, 128, 32)
    with pytest.raises(ValueError, match="must be positive"):
        check_sampler_args(args("--steps", "0"))
    with pytest.raises(ValueError, match="gen_length=30 is not a multiple of block_length=8"):
        check_sampler_args(args("--gen_length", "30", "--block_length", "8"))  # no model needed to know
    with pytest.raises(ValueError, match=r"gen_length 32 by default for the model's window of 128 tokens; pass "
                                         r"--gen_length too"):
        settings_from_args(args("--steps", "64"), 128)


def test_long_prompts_are_left_cropped_with_one_warning(caplog):
    fit = PromptWindow(10, 6)  # room for 4 prompt tokens
    with caplog.at_level(logging.WARNING, logger="remedi_patches.sampling"):
        assert fit.crop([[1, 2, 3], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5]]) == [[1, 2, 3], [3, 4, 5, 6], [2, 3, 4, 5]]
        assert fit.crop([[9, 8, 7, 6, 5]]) == [[8, 7, 6, 5]]  # cropped again, not reported again
        ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        cropped, cropped_mask = fit.crop_batch(ids, mask)
        assert cropped.tolist() == [[0, 5, 6, 7], [2, 3, 4, 5]] and cropped_mask.tolist() == [[0, 1, 1, 1], [1] * 4]
        assert fit.crop_batch(ids[1:], None)[1] is None
    warnings = [r.getMessage() for r in caplog.records if CROP in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "2 of 3 prompts" in warnings[0] and "window of 10" in warnings[0] and "cut by 1 to 2 tokens" in warnings[0]
    assert "--gen_length 6" in warnings[0]
    unlimited = PromptWindow(None, 6)
    assert unlimited.crop([[1] * 50]) == [[1] * 50]
    with pytest.raises(ValueError, match="gen_length 6 does not fit the model's window of 6"):
        PromptWindow(6, 6, flag="gen_length")


class PlainTokenizer:
    chat_template = None


class ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_one_prompt_rule():
    plain, chat = PlainTokenizer(), ChatTokenizer()
    for mode in ("auto", "off"):
        assert prompt_texts(plain, ["How many?"], mode) == (["Question: How many?\nAnswer:"], False)
    assert prompt_texts(plain, ["How many?"], "auto", "{question}") == (["How many?"], False)
    assert prompt_texts(plain, ["How many?"], "off", "Q: {question}\nA:") == (["Q: How many?\nA:"], False)
    for mode in ("auto", "on"):
        assert prompt_texts(chat, ["How many?"], mode) == (["<user>How many?</user><assistant>"], True)
    assert prompt_texts(chat, ["How many?"], "off") == (["Question: How many?\nAnswer:"], False)
    assert prompt_texts(chat, ["How many?"], "on", "Q: {question}") == (["<user>Q: How many?</user><assistant>"], True)
    with pytest.raises(ValueError, match="--chat on, but the tokenizer has no chat template"):
        uses_chat(plain, "on")
    with pytest.raises(ValueError, match="unknown --chat"):
        uses_chat(plain, "yes")


# ---------------------------------------------------------------- the entry points on the embedded model


def test_generate_runs_with_no_flags():
    result = run_cli(["generate.py"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(steps 32, gen_length 32, block_length 32)" in result.stdout
    answer = result.stdout.split("### answer\n", 1)[1].strip()
    assert "####" in answer, result.stdout
    assert "Traceback" not in result.stderr and CROP not in result.stderr


def test_generate_refuses_what_cannot_fit_and_chat_on_without_a_template():
    with pytest.raises(ValueError, match="--gen_length 128 does not fit the model's window of 128"):
        generate.main(["--gen_length", "128", "--device", "cpu"])
    with pytest.raises(ValueError, match="--chat on, but the tokenizer has no chat template"):
        infer_compare.main(["--chat", "on", "--prompt", "Hi", "--confidence_sources", "random", "--device", "cpu"])


@pytest.mark.parametrize("source,flags", [("random", ["--temperature", "0.7", "--seed", "3", "--prompt_template",
                                                      "Question: {question}\nAnswer: Let us compute."]),
                                          ("upstream", ["--gen_length", "96", "--steps", "48"])])
def test_infer_compare_prompt_answers_as_generate(source, flags, capsys, caplog):
    """The same flags and seed give the same answer (the second case crops the prompt to 32 tokens in both)."""
    shared = ["--prompt", MIA, "--device", "cpu", *flags]
    with caplog.at_level(logging.WARNING, logger="remedi_patches.sampling"):
        answers = generate.main(shared + ([] if source == "upstream" else ["--confidence_source", source]))
        compared = infer_compare.main(shared + ["--confidence_sources", source, "--quiet_steps"])
    assert compared["answers"][source] == answers and answers[0].strip()
    crops = [r for r in caplog.records if CROP in r.getMessage()]
    assert len(crops) == (2 if "--gen_length" in flags else 0)  # one per run
    capsys.readouterr()


@pytest.mark.slow
def test_eval_runs_with_no_flags(tmp_path, monkeypatch):
    """50 embedded problems under tps_prob and random (no --ups_head: no 'ups'), 32 / 32 / 32 from the window."""
    monkeypatch.chdir(tmp_path)  # eval_gsm_math writes out/eval_gsm_math under the working folder
    summary = E.main([])
    assert [(r["source"], r["n"]) for r in summary["results"]] == [("tps_prob", 50), ("random", 50)]
    assert summary["results"][0]["accuracy"] > 0.3  # the embedded backbone solves most of its own task
    saved = json.loads((tmp_path / "out" / "eval_gsm_math" / "summary.json").read_text())
    assert saved["settings"]["gen_length"] == 32 and saved["settings"]["confidence_sources"] == ["tps_prob", "random"]


def test_infer_compare_runs_with_no_flags(capsys):
    result = infer_compare.main([])
    assert list(result["answers"]) == ["tps_prob", "random"]
    assert all(len(a) == 2 and all(t.strip() for t in a) for a in result["answers"].values())
    out = capsys.readouterr().out
    assert out.count("=== prompt") == 2 and "[correct]" in out


@pytest.mark.parametrize("dataset,fmt", [("gsm8k", "gsm8k"), ("math500", "math")])
def test_eval_on_shared_problems_crops_with_one_warning(dataset, fmt, data_dir, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="remedi_patches.sampling"):
        summary = E.main(["--dataset", str(data_dir / dataset / "test.jsonl"), "--format", fmt, "--max_samples", "1",
                          "--confidence_sources", "tps_prob", "--out_dir", str(out), "--no_progress",
                          "--device", "cpu"])
    crops = [r.getMessage() for r in caplog.records if CROP in r.getMessage()]
    assert len(crops) == 1 and "1 of 1 prompts" in crops[0] and "window of 128" in crops[0], crops
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"].startswith("Question: ") and summary["results"][0]["n"] == 1


def test_harness_models_take_their_lengths_from_the_window(caplog):
    """The OpenCompass and lm-eval models with no length keys: 32 / 32 / 32 on the embedded model (window 128), and
    a GSM8K-length prompt is cropped with the one warning; an explicit length that cannot fit is refused at load."""
    from eval_llada import LLaDAEvalHarness
    from opencompass_patch.models import LLaDABaseModel

    lm = LLaDAEvalHarness(device="cpu", batch_size=1, mc_num=1)
    assert (lm.settings.steps, lm.settings.gen_length, lm.settings.block_length) == (32, 32, 32)
    oc = LLaDABaseModel(device="cpu", max_seq_len=100)  # its own budget caps the window: gen_length 100 // 4 -> 25
    assert (oc.settings.steps, oc.settings.gen_length, oc.settings.block_length) == (25, 25, 25)
    with caplog.at_level(logging.WARNING, logger="remedi_patches.sampling"):
        (answer,) = lm.generate_until([type("Req", (), {"args": (MIA * 8, {"until": ["\n"]})})()])
    assert isinstance(answer, str)
    assert sum(CROP in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="gen_length 128 does not fit the model's window of 128"):
        LLaDAEvalHarness(device="cpu", batch_size=1, mc_num=1, gen_length=128, steps=128, block_length=32).window
