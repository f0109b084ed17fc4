"""eval_gsm_math.py, infer_compare.py and bench/bench_embedded_accuracy.py end to end on a tiny SMDM backbone
(random weights, sentencepiece tokenizer trained on GSM8K / MATH / embedded text) saved like a real export."""
import json
import math
from pathlib import Path

import pytest
import torch

import bench_embedded_accuracy as B  # bench/ is on pytest.ini's pythonpath
import eval_gsm_math as E
import infer_compare
from remedi_patches import detection
from remedi_patches import metrics as M
from remedi_patches.backbones import load_eval_model
from remedi_patches.data import load_records
from remedi_patches.sampling import SamplerSettings
from remedi_patches.trajectory_views import answer_mask_counts, is_non_increasing

SAMPLER = ["--steps", "4", "--gen_length", "8", "--block_length", "4"]


def model_args(tiny: Path) -> list[str]:
    return ["--model", str(tiny), "--ups_head", str(tiny / "ups_head.safetensors"), "--device", "cpu"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- eval_gsm_math.py


@pytest.mark.slow
def test_gsm8k_end_to_end_and_regrade_reproduces_summary(tiny, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = E.main(model_args(tiny) + ["--dataset", str(data_dir / "gsm8k" / "test.jsonl"), "--max_samples", "10",
                                         "--infer_bs", "4", "--confidence_sources", "ups", "tps_prob", "random",
                                         "--out_dir", str(out), "--no_progress"] + SAMPLER)
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 30 and all(set(E.PREDICTION_KEYS) | set(E.COST_KEYS) <= set(r) for r in rows)
    assert all(r["nfe"] == 4 and r["tokens"] == 8 for r in rows)  # the fixed schedule: 2 blocks x 2 steps
    assert [r["source"] for r in rows] == ["ups"] * 10 + ["tps_prob"] * 10 + ["random"] * 10
    assert [r["index"] for r in rows[:10]] == list(range(10))
    assert rows[0]["gold"] == "18" and rows[0]["prompt"].startswith("Question: Janet")
    assert all(r["seconds"] > 0 for r in rows)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["results"] == summary["results"]
    assert [r["n"] for r in summary["results"]] == [10, 10, 10]
    assert saved["settings"]["confidence_sources"] == ["ups", "tps_prob", "random"]
    table = (out / "summary.md").read_text()
    assert table.strip() == E.markdown_table(summary) and "| tps_prob |" in capsys.readouterr().out

    regraded = E.main(["--predictions", str(out / "predictions.jsonl"), "--out_dir", str(tmp_path / "again")])
    assert regraded["results"] == summary["results"]
    again = json.loads((tmp_path / "again" / "regraded_summary.json").read_text())
    assert again["results"] == summary["results"] and again["changed"] == 0
    assert read_jsonl(tmp_path / "again" / "regraded_predictions.jsonl") == rows


def test_regrade_recomputes_every_verdict(tmp_path):
    rows = [
        {"index": 0, "source": "ups", "format": "gsm8k", "prompt": "q", "output": "5+4=9. #### 1,800",
         "extracted": None, "gold": "1800", "correct": False, "seconds": 0.5},
        {"index": 1, "source": "ups", "format": "gsm8k", "prompt": "q", "output": "no idea",
         "extracted": "7", "gold": "7", "correct": True, "seconds": 1.5},
        {"index": 0, "source": "random", "format": "math", "prompt": "q", "output": "so \\boxed{\\dfrac{1}{2}}.",
         "extracted": None, "gold": "\\frac{1}{2}", "correct": False, "seconds": 0.25},
    ]
    path = E.write_jsonl(tmp_path / "predictions.jsonl", rows)
    summary = E.main(["--predictions", str(path)])
    assert summary["results"] == [  # rows written before nfe / tokens existed: no cost
        {"source": "ups", "n": 2, "correct": 1, "accuracy": 0.5, "token_accuracy": None, "coverage": 0.5,
         "mean_seconds": 1.0, "nfe": None, "tokens_per_second": None},
        {"source": "random", "n": 1, "correct": 1, "accuracy": 1.0, "token_accuracy": None, "coverage": 1.0,
         "mean_seconds": 0.25, "nfe": None, "tokens_per_second": None},
    ]
    assert "| ups | 0.500 | - | 0.500 | 2 | 1.000 | - | - |" in E.markdown_table(summary)
    new = read_jsonl(tmp_path / "regraded_predictions.jsonl")
    assert [(r["extracted"], r["correct"]) for r in new] == [("1800", True), (None, False), ("\\dfrac{1}{2}", True)]
    assert json.loads((tmp_path / "regraded_summary.json").read_text())["changed"] == 3


@pytest.mark.slow
def test_math_format_end_to_end(tiny, data_dir, tmp_path):
    out = tmp_path / "math"
    summary = E.main(model_args(tiny) + ["--dataset", str(data_dir / "math500" / "test.jsonl"), "--format", "math",
                                         "--max_samples", "3", "--infer_bs", "3", "--confidence_sources", "tps_prob",
                                         "--out_dir", str(out), "--no_progress"] + SAMPLER)
    rows = read_jsonl(out / "predictions.jsonl")
    records = [json.loads(line) for _, line in zip(range(3), open(data_dir / "math500" / "test.jsonl"))]
    assert [r["gold"] for r in rows] == [r["answer"] for r in records]  # the short answer, not the solution
    assert all(r["format"] == "math" and "\\boxed{}" in r["prompt"] for r in rows)
    assert summary["results"][0]["n"] == 3
    assert E.summarise(E.regrade(rows)) == summary


def test_summary_cost_per_source_and_old_rows():
    """nfe: the mean per problem; tokens/s: sum of tokens / sum of seconds; None when a row of the source lacks them."""
    row = {"index": 0, "format": "gsm8k", "prompt": "q", "output": "#### 2", "extracted": "2", "gold": "2",
           "correct": True}
    rows = [{**row, "source": "fast", "seconds": 0.5, "nfe": 3, "tokens": 8},
            {**row, "source": "fast", "seconds": 1.5, "nfe": 6, "tokens": 8},
            {**row, "source": "mixed", "seconds": 1.0, "nfe": 4, "tokens": 8},
            {**row, "source": "mixed", "seconds": 1.0}]
    fast, mixed = E.summarise(rows)["results"]
    assert (fast["nfe"], fast["tokens_per_second"]) == (4.5, 8.0)
    assert (mixed["nfe"], mixed["tokens_per_second"]) == (None, None)
    table = E.markdown_table(E.summarise(rows)).splitlines()
    assert table[0] == "| source | accuracy | token acc. | coverage | n | s / problem | NFE | tokens/s |"
    assert table[2] == "| fast | 1.000 | - | 1.000 | 2 | 1.000 | 4.5 | 8.0 |" and table[3].endswith("| - | - |")


def test_token_accuracy_by_hand():
    """matches / len(reference), position by position; missing positions wrong, extra generated ones unscored."""
    assert M.token_accuracy([5, 9, 7], [5, 6, 7, 8]) == 0.5  # 5 and 7 match; 8 is missing
    assert M.token_accuracy([5, 6, 7, 8, 1, 1], [5, 6, 7, 8]) == 1.0
    assert M.token_accuracy([6, 7, 8], [5, 6, 7]) == 0.0  # shifted by one: nothing lines up
    assert math.isnan(M.token_accuracy([1], []))
    eos, eot = 0, 1
    stop = [eos, eot]
    # the answer span: tokens up to the first stop (written as EOS), scored against the reference + EOS
    assert M.answer_span([5, 6, eot, 3, 3], stop, eos) == [5, 6, eos]
    assert M.answer_token_accuracy([5, 6, eot, 3, 3], [5, 6], stop, eos) == 1.0  # stops exactly where it should
    assert M.answer_token_accuracy([5, 6, 7, eos], [5, 6], stop, eos) == pytest.approx(2 / 3)  # too long: EOS slot
    assert M.answer_token_accuracy([5, eos, 3, 3], [5, 6, 7], stop, eos) == 0.25  # too short: 6, 7 and EOS missing
    assert M.answer_token_accuracy([5, 6, 7, 7], [5, 6, 7], stop, eos) == 0.75  # never stopped: EOS slot wrong
    assert M.answer_token_accuracy([eos, 4, 4], [5], stop, eos) == 0.0


def test_bad_cost_fields_name_file_and_line(tmp_path):
    row = {"index": 0, "source": "ups", "format": "gsm8k", "prompt": "q", "output": "#### 2", "extracted": "2",
           "gold": "2", "correct": True, "seconds": 0.5}
    path = E.write_jsonl(tmp_path / "p.jsonl", [{**row, "nfe": 4, "tokens": 8}, {**row, "nfe": "four"}])
    with pytest.raises(ValueError, match="p.jsonl, line 2: nfe must be a number >= 0"):
        E.read_predictions(path)
    path = E.write_jsonl(tmp_path / "t.jsonl", [{**row, "token_accuracy": 0.5}, {**row, "token_accuracy": 1.5}])
    with pytest.raises(ValueError, match=r"t.jsonl, line 2: token_accuracy must be a number in \[0, 1\]"):
        E.read_predictions(path)


def test_rows_carry_their_sampler_calls_cost(tiny, tmp_path):
    """Fast decoding (threshold over the dual cache): each row's nfe is the forwards of the sampler call that
    answered it, tokens its gen_length; the summary averages them and its settings name the fast-decoding flags."""
    from remedi_patches.remasking import Trajectory

    em = load_eval_model(str(tiny), device="cpu")
    items = E.make_items(load_records("embedded", "test", limit=3), "gsm8k")
    settings = SamplerSettings(steps=4, gen_length=8, block_length=4, threshold=0.3, cache="dual")
    rows, summary = E.evaluate(em, items, E.parse_runs(["tps_prob"]), settings, batch_size=1, progress=False)
    texts, applied = E.item_texts(em.tokenizer, items)
    for row, text, item in zip(rows, texts, items):
        alone = Trajectory(record_steps=False)
        ids, _ = E.sample_answer_ids(em, [text], settings.replace(confidence_source="tps_prob"), applied,
                                     trajectory=alone)
        assert (row["nfe"], row["tokens"]) == (alone.forwards, 8) and 2 <= row["nfe"] <= 8
        assert row["output"] == E.decode_answers(em.tokenizer, ids, 0, em.stop_ids)[0]
        reference = em.tokenizer(item.reference, add_special_tokens=False)["input_ids"]  # as SFT tokenises answers
        assert row["token_accuracy"] == M.answer_token_accuracy(ids[0].tolist(), reference, em.stop_ids, em.eos_id)
    (result,) = summary["results"]
    assert result["nfe"] == pytest.approx(sum(r["nfe"] for r in rows) / 3)
    assert result["tokens_per_second"] == pytest.approx(3 * 8 / sum(r["seconds"] for r in rows))
    assert result["token_accuracy"] == pytest.approx(sum(r["token_accuracy"] for r in rows) / 3)

    out = tmp_path / "run"
    E.main(model_args(tiny) + ["--max_samples", "2", "--confidence_sources", "tps_prob", "--threshold", "0.3",
                               "--cache", "dual", "--out_dir", str(out), "--no_progress"] + SAMPLER)
    saved = json.loads((out / "summary.json").read_text())
    assert (saved["settings"]["threshold"], saved["settings"]["cache"]) == (0.3, "dual")
    assert saved["settings"]["factor"] is None and saved["results"][0]["nfe"] >= 2
    assert "| NFE | tokens/s |" in (out / "summary.md").read_text()


def test_make_items_fields_and_prompts(data_dir):
    gsm = load_records(str(data_dir / "gsm8k" / "test.jsonl"), limit=2)
    items = E.make_items(gsm, "gsm8k")
    assert items[0].prompt == f"Question: {gsm[0]['question']}\nAnswer:" and items[0].gold == "18"
    assert items[0].reference == gsm[0]["answer"]
    custom = E.make_items(gsm, "gsm8k", prompt_template="Q: {question}\nA:")
    assert custom[1].prompt == f"Q: {gsm[1]['question']}\nA:"
    math500 = load_records(str(data_dir / "math500" / "test.jsonl"), limit=1)
    math = E.make_items(math500, "math", answer_field="solution")
    assert math[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"  # the last \boxed{} of the solution
    with pytest.raises(ValueError, match="placeholder"):
        E.make_items(gsm, "gsm8k", prompt_template="Q:")
    with pytest.raises(ValueError, match="holds no number"):
        E.make_items([{"question": "q", "answer": "none"}], "gsm8k")
    with pytest.raises(ValueError, match="not in the dataset"):
        E.make_items(gsm, "gsm8k", answer_field="missing")


def test_runs_are_parsed_and_checked():
    runs = E.parse_runs(["ups", "tps_prob:noremask", "upstream"])
    assert [(r.source, r.remask, r.label) for r in runs] == [
        ("ups", True, "ups"), ("tps_prob", False, "tps_prob:noremask"), (None, False, "upstream")]
    assert [r.label for r in E.parse_runs(["ups", "random"], no_remask=True)] == ["ups:noremask", "random:noremask"]
    with pytest.raises(ValueError, match="unknown confidence source"):
        E.parse_runs(["best"])
    with pytest.raises(ValueError, match="each once"):
        E.parse_runs(["ups", "ups"])


def test_bad_inputs_name_the_fix(tiny, tmp_path):
    em = load_eval_model(str(tiny), device="cpu")  # no head
    item = E.EvalItem(0, "Question: Tom has 3 pens.\nAnswer:", "3")
    with pytest.raises(ValueError, match="--ups_head"):
        E.evaluate(em, [item], E.parse_runs(["ups"]), SamplerSettings(4, 8, 8), progress=False)
    with pytest.raises(ValueError, match="--infer_bs"):
        E.evaluate(em, [item], E.parse_runs(["random"]), SamplerSettings(4, 8, 8), batch_size=0)
    with pytest.raises(FileNotFoundError, match="predictions"):
        E.main(["--predictions", str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0}\n{"truncat')
    with pytest.raises(ValueError, match="bad.jsonl, line 1 lacks"):
        E.read_predictions(bad)


@pytest.mark.parametrize("build", [E.build_parser, infer_compare.build_parser, B.build_parser,
                                   detection.build_parser])
def test_every_flag_is_documented_with_its_default(build):
    parser = build()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []
    assert "(default:" in parser.format_help()
    if build is E.build_parser:
        for flag in ("--confidence_sources", "--infer_bs", "--eos_gating", "--predictions", "--format", "--model"):
            assert flag in parser.format_help()


@pytest.mark.slow
def test_batches_decode_like_single_prompts(tiny, data_dir):
    em = load_eval_model(str(tiny), device="cpu", ups_head_path=str(tiny / "ups_head.safetensors"))
    items = E.make_items(load_records(str(data_dir / "gsm8k" / "test.jsonl"), limit=3), "gsm8k")
    runs = E.parse_runs(["tps_prob", "ups"])
    settings = SamplerSettings(steps=4, gen_length=8, block_length=4)
    alone, _ = E.evaluate(em, items, runs, settings, batch_size=1, progress=False)
    batched, _ = E.evaluate(em, items, runs, settings, batch_size=3, progress=False)
    assert [r["output"] for r in batched] == [r["output"] for r in alone]


# ---------------------------------------------------------------- infer_compare.py


@pytest.mark.slow
def test_infer_compare_side_by_side_with_trajectories(tiny, tmp_path, capsys):
    result = infer_compare.main(model_args(tiny) + ["--dataset", "embedded", "--max_samples", "2",
                                                    "--confidence_sources", "ups", "tps_prob", "--html",
                                                    str(tmp_path / "t.html"), "--png_dir", str(tmp_path)] + SAMPLER)
    assert list(result["answers"]) == ["ups", "tps_prob"]
    for label, traces in result["traces"].items():
        assert len(traces) == 2
        for trace in traces:
            counts = answer_mask_counts(trace)  # 2 blocks of 4, 2 steps each: k = 2, 4
            assert counts == [8, 6, 4, 2, 0] and is_non_increasing(counts)
            assert trace.block_masks == [2, 0, 2, 0]
            assert int((trace.states[-1] == trace.mask_id).sum()) == 0
    out = capsys.readouterr().out
    assert out.count("=== prompt") == 2 and out.count("--- trajectory: ups") == 2
    assert out.startswith("(steps 4, gen_length 8, block_length 4) decoding: llada\n")
    for label, cost in result["costs"].items():  # one sampler call per source: 2 blocks x 2 steps
        assert cost["nfe"] == 4 and cost["tokens_per_second"] > 0
        answer_lines = [line for line in out.splitlines() if line.split(" ", 1)[0] == label]
        assert len(answer_lines) == 2 and all(line.endswith(f"; {cost['text']})") for line in answer_lines)
        assert cost["text"].startswith("NFE 4, ")
    assert out.count("masks 0 in block, 0 in answer") == 4 and "re-masked" in out and "[wrong]" in out
    names = {f.name for f in result["files"]}
    assert {"t.html", "mask_counts_p0.png", "trajectory_p1_tps_prob.png"} <= names
    assert all(f.stat().st_size > 1000 for f in result["files"])


@pytest.mark.slow
def test_infer_compare_free_prompts(tiny, capsys):
    result = infer_compare.main(model_args(tiny) + ["--prompt", "Question: Tom has 3 pens.\nAnswer:",
                                                    "--confidence_sources", "random", "upstream", "--quiet_steps"]
                                + SAMPLER)
    assert set(result["answers"]) == {"random", "upstream"} and result["files"] == []
    out = capsys.readouterr().out
    assert "--- answers\n" in out and "trajectory" not in out


# ---------------------------------------------------------------- bench/bench_embedded_accuracy.py


def test_sign_test():
    assert B.sign_test(0, 0) == 1.0
    assert B.sign_test(5, 0) == pytest.approx(2 / 32)
    assert B.sign_test(3, 3) == 1.0
    assert B.sign_test(1, 9) == B.sign_test(9, 1) == pytest.approx(2 * 11 / 1024)
    with pytest.raises(ValueError, match="divide"):
        B.step_budgets(32, [3])


@pytest.mark.slow
def test_bench_writes_both_tables_and_regradable_predictions(tiny, tmp_path):
    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    try:  # the script sets its own thread count (--threads); give the session's back afterwards
        result = B.main(model_args(tiny) + ["--n_problems", "3", "--batch_size", "3", "--gen_length", "8",
                                            "--block_length", "8", "--fractions", "1", "2", "--out_dir", str(out),
                                            "--no_progress"])
    finally:
        torch.set_num_threads(threads)
    assert "torch threads 1," in (out / "results.md").read_text()
    assert result["steps"] == [8, 4]
    text = (out / "results.md").read_text()
    for label in B.MAIN_SOURCES + B.HEURISTICS:
        assert f"| {label} |" in text
    assert "8 steps (1 tok/step) | 4 steps (2 tok/step)" in text and "Command: `python bench/" in text
    assert "sign-test p" in text and "detection" in text
    assert [d["incorrect_source"] for d in result["detection"]] == ["uniform", "tps"]
    assert all(d["n_scored"] > 0 for d in result["detection"])
    assert all(cell["remasks_per_problem"] >= 0 for by_steps in result["results"].values()
               for cell in by_steps.values())
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 6 * 2 * 3
    regraded = {r["source"]: r for r in E.summarise(E.regrade(rows))["results"]}
    for label, by_steps in result["results"].items():
        for steps, cell in by_steps.items():
            assert regraded[f"{label}@{steps}"]["accuracy"] == cell["accuracy"]
            assert regraded[f"{label}@{steps}"]["token_accuracy"] == cell["token_accuracy"]
            assert 0 <= cell["token_accuracy"] <= 1
    assert "Token-level accuracy on the answer span" in text
    with pytest.raises(FileNotFoundError, match="train_remedi"):
        B.main(["--ups_head", str(tmp_path / "none.safetensors")])
