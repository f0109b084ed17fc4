"""Bad input to the sampling / evaluation CLIs, run as a user would (subprocess): one `error:` line naming the problem,
exit 2, no traceback, nothing loaded first, and files that existed before left as they were.

One run per bad-input class and CLI (each costs a few seconds of imports):
    generate.py       a bad flag value, a missing local --ups_head, a missing local --model
    eval_gsm_math.py  a bad flag value, a missing local --lora_path, a malformed --predictions file (file:line),
                      a second run on an --out_dir another run holds
    infer_compare.py  a bad flag value, a missing local --model
    demo.py           a bad flag value, an --out_dir that is a file
    fast decoding     conflicting --threshold / --factor (generate.py), --cache_interval without --cache
                      (eval_gsm_math.py), --cache with --decoding block (infer_compare.py)
Also generate.py's header line (the decoding, the fast-decoding settings, the cost) on a tiny model, in process.
"""
import json
import os
import re

import pytest

from cli_helpers import assert_user_error, run_cli, unchanged

PREDICTION = {"index": 0, "source": "ups", "format": "gsm8k", "prompt": "Question: 1 + 1?\nAnswer:",
              "output": "1 + 1 = 2 #### 2", "extracted": "2", "gold": "2", "correct": True, "seconds": 0.5}


@pytest.fixture
def out_dir(tmp_path):
    """An output folder holding the files of an earlier run (which must survive every failed run)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text(json.dumps(PREDICTION) + "\n")
    (out / "summary.json").write_text('{"results": []}\n')
    return out


# ---------------------------------------------------------------- generate.py


def test_generate_bad_flag_value(out_dir):
    with unchanged(out_dir):
        result = run_cli(["generate.py", "--steps", "64", "--gen_length", "32", "--block_length", "32"])
    assert_user_error(result, "steps=64 > gen_length=32", "steps <= gen_length")


def test_generate_missing_local_paths(tmp_path):
    result = run_cli(["generate.py", "--ups_head", str(tmp_path / "missing.safetensors"), "--confidence_source", "ups"])
    assert_user_error(result, "--ups_head", "missing.safetensors", "does not exist")
    result = run_cli(["generate.py", "--model", str(tmp_path / "no_model"), "--steps", "8"])
    line = assert_user_error(result, "--model", "no_model", "does not exist")
    assert "could not get" not in line  # reported as a local path, not as a failed hub download


# ---------------------------------------------------------------- eval_gsm_math.py


def test_eval_bad_flag_value_before_loading(out_dir):
    with unchanged(out_dir):
        result = run_cli(["eval_gsm_math.py", "--gen_length", "30", "--block_length", "8", "--out_dir", str(out_dir)])
    assert_user_error(result, "gen_length=30 is not a multiple of block_length=8")


def test_eval_missing_local_lora(out_dir, tmp_path):
    with unchanged(out_dir):
        result = run_cli(["eval_gsm_math.py", "--lora_path", str(tmp_path / "lora"), "--confidence_sources",
                          "tps_prob", "--out_dir", str(out_dir)])
    assert_user_error(result, "--lora_path", "does not exist")


def test_eval_malformed_predictions_name_file_and_line(out_dir):
    bad = out_dir / "broken.jsonl"
    bad.write_text(json.dumps(PREDICTION) + "\n" + json.dumps(PREDICTION)[:-9] + "\n")
    with unchanged(out_dir):
        result = run_cli(["eval_gsm_math.py", "--predictions", str(bad)])
    assert_user_error(result, f"{bad}, line 2: not valid JSON")
    assert not (out_dir / "regraded_predictions.jsonl").exists()


def test_eval_second_run_on_a_held_out_dir_refuses(out_dir):
    """A live process (this test's) holds the lock: a re-grade into the same folder refuses and writes nothing."""
    lock = out_dir / ".run.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with unchanged(out_dir):
        result = run_cli(["eval_gsm_math.py", "--predictions", str(out_dir / "predictions.jsonl")])
    assert_user_error(result, "in use by another run", f"pid {os.getpid()}")
    assert not (out_dir / "regraded_predictions.jsonl").exists()
    lock.unlink()  # the holder is gone: the same command now runs
    result = run_cli(["eval_gsm_math.py", "--predictions", str(out_dir / "predictions.jsonl")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out_dir / "regraded_summary.json").is_file() and not lock.exists()
    assert [p.name for p in out_dir.iterdir() if p.suffix == ".tmp"] == []


# ---------------------------------------------------------------- infer_compare.py


def test_infer_compare_bad_flag_value():
    assert_user_error(run_cli(["infer_compare.py", "--steps", "0"]), "must be positive")


def test_infer_compare_missing_local_model(tmp_path):
    result = run_cli(["infer_compare.py", "--model", str(tmp_path / "ckpt.pth"), "--confidence_sources", "random"])
    assert_user_error(result, "--model", "ckpt.pth", "does not exist")


# ---------------------------------------------------------------- fast decoding flags


@pytest.mark.parametrize("argv, fragments", [
    (["generate.py", "--threshold", "0.9", "--factor", "1"], ["threshold=0.9 and factor=1.0", "give one"]),
    (["eval_gsm_math.py", "--cache_interval", "2"], ["cache_interval=2 refreshes a KV cache", "cache is None"]),
    (["infer_compare.py", "--decoding", "block", "--cache", "dual"], ["block decoding already caches exactly"]),
])
def test_bad_fast_decoding_flags(argv, fragments, out_dir):
    with unchanged(out_dir):
        result = run_cli(argv + (["--out_dir", str(out_dir)] if argv[0] == "eval_gsm_math.py" else []))
    assert_user_error(result, *fragments)


def test_generate_prints_the_decoding_and_the_cost(tiny, capsys):
    """The header names the fast-decoding settings that are set and the call's cost; --show_trajectory ends with
    the cost too. Without fast decoding the header stays as it was, plus the cost."""
    import generate

    flags = ["--model", str(tiny), "--device", "cpu", "--steps", "4", "--gen_length", "8", "--block_length", "4",
             "--prompt", "Tom has 3 pens."]
    generate.main(flags + ["--confidence_source", "tps_prob", "--threshold", "0.3", "--cache", "dual",
                           "--cache_interval", "2", "--show_trajectory"])
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert re.fullmatch(r"\(steps 4, gen_length 8, block_length 4\) decoding: llada, cache: dual, cache_interval 2, "
                        r"threshold 0\.3 \| NFE \d+, \d+\.\d tokens/s", header), header
    nfe = int(header.split("NFE ")[1].split(",")[0])
    assert 2 <= nfe <= 8  # 1 to block_length (4) forwards per block
    assert out.rstrip().splitlines()[-1] == "cost: " + header.split(" | ")[1]
    assert out.count("\nrow 0:\n") == 1 and out.count("  step ") == nfe  # one line per forward (one row)
    generate.main(flags)
    out = capsys.readouterr().out
    assert re.fullmatch(r"\(steps 4, gen_length 8, block_length 4\) decoding: llada \| NFE 4, \d+\.\d tokens/s",
                        out.splitlines()[0]), out
    assert "row 0:" not in out and "cost:" not in out


# ---------------------------------------------------------------- demo.py


def test_demo_bad_flag_value(out_dir):
    with unchanged(out_dir):
        result = run_cli(["demo.py", "--steps", "32", "64", "--out_dir", str(out_dir)])
    assert_user_error(result, "steps=64 > gen_length=32")
    assert not (out_dir / "train").exists()  # refused before training


def test_demo_out_dir_that_is_a_file(out_dir):
    target = out_dir / "summary.json"
    with unchanged(out_dir):
        result = run_cli(["demo.py", "--out_dir", str(target), "--train_steps", "1"])
    assert_user_error(result, "--out_dir", "is a file")
