"""SMDM/sedd/sample.py: a tiny random SEDD (absorbing graph) paired with the embedded tokenizer, sampled in-process;
its one-line errors; generate.py refusing a SEDD."""
import pytest
import torch

from cli_helpers import assert_user_error, run_cli
from remedi_patches.backbones import load_backbone
from remedi_patches.sedd import answers as sedd_answers
from sedd_helpers import random_sedd
from trainer_helpers import load_script

sedd_sample = load_script("SMDM/sedd/sample.py")
generate = load_script("generate.py")

WINDOW = 48


@pytest.fixture(scope="module")
def tokenizer():
    return load_backbone(None).tokenizer  # the embedded sentencepiece tokenizer (512 tokens)


@pytest.fixture(scope="module")
def sedd_folder(tmp_path_factory):
    return random_sedd(tmp_path_factory.mktemp("sedd") / "tiny", WINDOW)


@pytest.fixture(scope="module")
def loaded(sedd_folder):
    return load_backbone(sedd_folder)


def base(folder, *extra):
    return ["--model", str(folder), "--device", "cpu", "--steps", "4", "--gen_length", "8", *extra]


@pytest.mark.parametrize("predictor", ["analytic", "euler"])
def test_sample_answers_keep_the_prompt_and_leave_no_mask(loaded, tokenizer, predictor):
    model = loaded.model
    prompts = [sedd_answers.encode_prompt(tokenizer, p) for p in ("Hello there", "A much longer prompt than that")]
    assert len(prompts[0]) != len(prompts[1])

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return sedd_answers.sample_answers(model, prompts, 8, steps=5, predictor=predictor, num_samples=3, generator=g)

    out = draw(0)
    for ids, x in zip(prompts, out):
        assert x.shape == (3, len(ids) + 8) and x.dtype == torch.long
        assert torch.equal(x[:, :len(ids)], torch.tensor(ids).expand(3, -1))  # the prompt is never changed
        assert not (x == model.config.mask_token_id).any()  # the denoiser removes every mask
        assert int(x.max()) < model.config.tokens
    assert all(torch.equal(a, b) for a, b in zip(out, draw(0)))  # deterministic for a seed
    assert not all(torch.equal(a, b) for a, b in zip(out, draw(1)))
    uncond = sedd_answers.sample_answers(model, [[]], 6, steps=3, predictor=predictor, num_samples=2)[0]
    assert uncond.shape == (2, 6)


def test_sample_rows_batch_ragged_prompts_in_the_sft_layout(loaded, tokenizer):
    model = loaded.model
    prompts = [sedd_answers.encode_prompt(tokenizer, p) for p in ("Hi", "A much longer prompt than that", "Mid one")]
    g = torch.Generator().manual_seed(0)
    x = sedd_answers.sample_rows(model, prompts, 24, steps=4, generator=g)
    assert x.shape == (3, 24)
    for ids, row in zip(prompts, x):  # each prompt at [0, n), never changed; the answer right after it
        assert row[:len(ids)].tolist() == ids
    assert not (x == model.config.mask_token_id).any()
    with pytest.raises(ValueError, match="every prompt needs"):
        sedd_answers.sample_rows(model, [list(range(24))], 24, steps=2)
    with pytest.raises(ValueError, match="exceed the model's window"):
        sedd_answers.sample_rows(model, prompts, WINDOW + 1, steps=2)


def test_callback_sees_each_step_and_masks_decode_as_text(loaded):
    seen = []
    x = sedd_answers.sample_answers(loaded.model, [[]], 40, steps=2, denoise=False,
                                    generator=torch.Generator().manual_seed(0),
                                    callback=lambda i, step, t, x: seen.append((i, step, t, x.clone())))[0]
    mask = loaded.model.config.mask_token_id
    assert [s[:2] for s in seen] == [(0, 0), (0, 1)] and abs(seen[0][2] - 0.5) < 1e-3
    assert torch.equal(seen[1][3], x)  # without the denoiser, the last step's draw is the sample
    ids = x[0, :6].tolist()
    ids[2] = ids[4] = mask  # what --no_denoise can leave (a trained model leaves some masks at t = eps)
    text = sedd_answers.decode_ids(loaded.tokenizer, ids, mask)
    assert text.count(sedd_answers.MASK_TEXT) == 2


def test_decode_cuts_at_eos(tokenizer):
    ids = tokenizer("one two", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert sedd_answers.decode_ids(tokenizer, ids + [eos] + ids, None, [eos]) == tokenizer.decode(ids)


@pytest.mark.parametrize("predictor", ["analytic", "euler"])
def test_main_prints_answers(sedd_folder, predictor, capsys):
    argv = base(sedd_folder, "--prompt", "Hello there", "--prompt", "Another, longer prompt", "--num_samples", "2",
                "--predictor", predictor, "--seed", "3", "--show_steps", "--temperature", "0.5")
    answers = sedd_sample.main(argv)
    out = capsys.readouterr().out
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert "### prompt\nHello there" in out and "### answer 2/2" in out and "step 4/4" in out
    assert sedd_sample.main(argv) == answers  # deterministic for a seed
    uncond = sedd_sample.main(base(sedd_folder, "--predictor", predictor))
    assert len(uncond) == 1 and "### sample" in capsys.readouterr().out


def test_cli_errors_in_process(sedd_folder, tmp_path):
    with pytest.raises(ValueError, match=r"--gen_length 50 .*window of 48"):
        sedd_sample.main(base(sedd_folder, "--gen_length", "50"))
    with pytest.raises(ValueError, match=r"--gen_length 30 after a prompt of 23 tokens .*window of 48"):
        sedd_sample.main(base(sedd_folder, "--gen_length", "30", "--prompt", "a prompt of several tokens here"))
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        sedd_sample.main(base(sedd_folder, "--steps", "0"))
    with pytest.raises(ValueError, match="--temperature must be a finite number >= 0"):
        sedd_sample.main(base(sedd_folder, "--temperature", "-1"))
    with pytest.raises(ValueError, match="--prompt is empty"):
        sedd_sample.main(base(sedd_folder, "--prompt", "  "))
    with pytest.raises(FileNotFoundError, match="--model"):
        sedd_sample.main(base(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="is not a SEDD model; use generate.py"):
        sedd_sample.main(base("embedded_remedi"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is not a SEDD model"):
        sedd_sample.main(base(empty))


def test_cli_error_is_one_line(sedd_folder):
    result = run_cli(["SMDM/sedd/sample.py", *base(sedd_folder, "--gen_length", "100")])
    assert_user_error(result, "--gen_length", "window of 48")
    result = run_cli(["SMDM/sedd/sample.py", "--model", "embedded_remedi", "--device", "cpu"])
    assert_user_error(result, "not a SEDD model", "generate.py")


def test_generate_refuses_a_sedd(sedd_folder):
    with pytest.raises(ValueError, match=r"SEDD model.*python SMDM/sedd/sample.py --model"):
        generate.main(["--model", str(sedd_folder), "--device", "cpu", "--gen_length", "8", "--steps", "8",
                       "--block_length", "8"])
