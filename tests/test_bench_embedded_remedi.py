"""bench/bench_embedded_accuracy.py with dual-stream RemeDi models (--remedi): cells equal eval_gsm_math.evaluate,
re-mask events counted from the sampler's Trajectory, and the whole bench on the untrained embedded RemeDi."""
import json

import pytest
import torch

import bench_embedded_accuracy as B  # bench/ is on pytest.ini's pythonpath
import eval_gsm_math as E
from remedi_patches.backbones import load_eval_model
from remedi_patches.embedded.task import make_split
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import SamplerSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def embedded_remedi(tmp_path_factory):
    """The untrained embedded dual-stream RemeDi (python -m remedi_patches.embedded.remedi)."""
    from remedi_patches.embedded.remedi import build_embedded_remedi

    return build_embedded_remedi(tmp_path_factory.mktemp("er") / "er_untrained")


def items(n: int) -> list:
    return E.make_items([{"question": p.question, "answer": p.solution} for p in make_split(n, 0, "test")], "gsm8k")


def test_remask_events_count_up_to_the_answers_last_block():
    """Two rows, two blocks of 2 after a 1-token prompt: row 0 writes EOS (id 9) in block 0, so its re-masks in
    block 1 (decoded only because row 1 went on) are not counted; row 1 has no EOS: every block counts."""
    t = Trajectory(keep_tokens=True)
    no = torch.zeros(2, 2, dtype=torch.bool)
    t.record(0, 0, 1, no, torch.tensor([[True, False], [True, True]]), torch.zeros(2), torch.zeros(2, 5))
    t.record(1, 0, 3, no, torch.tensor([[True, True], [False, True]]), torch.zeros(2),
             torch.tensor([[0, 4, 9, 5, 5], [0, 4, 4, 5, 5]]))
    assert B.remask_events(t, prompt_len=1, stop_ids=[9]) == [1, 3]
    assert B.remask_events(t, prompt_len=1, stop_ids=[7]) == [3, 3]


@pytest.mark.parametrize("which", ["backbone", "remedi"])
def test_cells_equal_eval_gsm_math_evaluate(tiny, embedded_remedi, which):
    """run_cell samples and grades exactly what evaluate does (same batches, seed, rows), plus `remasks`; a
    source that never re-masks counts none."""
    if which == "backbone":
        em = load_eval_model(str(tiny), ups_head_path=str(tiny / "ups_head.safetensors"), device="cpu")
    else:
        em = load_eval_model(str(embedded_remedi), device="cpu")
    problems = items(5)
    settings = SamplerSettings(steps=8, gen_length=16, block_length=8)  # 4 steps per block: room to re-mask
    runs = E.parse_runs(["ups", "ups:noremask", "random"])
    want, _ = E.evaluate(em, problems, runs, settings, batch_size=2, seed=3, progress=False)
    got = []
    for run in runs:
        got += B.run_cell(em, problems, run, settings, batch_size=2, seed=3, label=run.label, progress=False)
    assert [{k: r[k] for k in ("index", "source", "output", "correct")} for r in got] == \
        [{k: r[k] for k in ("index", "source", "output", "correct")} for r in want]
    remasks = {run.label: [r["remasks"] for r in got if r["source"] == run.label] for run in runs}
    assert remasks["ups:noremask"] == [0] * 5 and sum(remasks["random"]) > 0


def test_bench_on_the_untrained_embedded_remedi(tiny, embedded_remedi, tmp_path, capsys):
    """The backbone + head rows (tiny) beside a dual-stream RemeDi's own rows, re-mask counts, both pairings and
    the detection AUCs; then --skip_baseline with two labelled copies of the model."""
    out = tmp_path / "bench"
    sizes = ["--n_problems", "3", "--batch_size", "3", "--gen_length", "8", "--block_length", "8", "--fractions",
             "1", "2", "--no_progress", "--device", "cpu"]
    threads = torch.get_num_threads()
    try:  # the script sets its own thread count (--threads); give the session's back afterwards
        result = B.main(["--model", str(tiny), "--ups_head", str(tiny / "ups_head.safetensors"), "--sources", "ups",
                         "tps_prob", "--heuristics", "--remedi", str(embedded_remedi), "--out_dir", str(out)] + sizes)
        text = (out / "results.md").read_text()
        assert "| backbone + head | ups |" in text and "| er_untrained | ups:noremask |" in text
        assert "Re-mask events per problem" in text and "| model | steps | ups only | ups:noremask only |" in text
        assert set(result["results"]) == {"ups", "tps_prob"} | {f"er_untrained/{s}" for s in B.REMEDI_SOURCES}
        for label, by_steps in result["results"].items():
            assert set(by_steps) == {"8", "4"}
            assert all(cell["remasks_per_problem"] >= 0 for cell in by_steps.values())
            if label.endswith(":noremask"):
                assert all(cell["remasks_per_problem"] == 0 for cell in by_steps.values())
        assert [p["model"] for p in result["paired"]["ups vs tps_prob"]] == ["backbone + head"] * 2 + \
            ["er_untrained"] * 2
        assert [p["model"] for p in result["paired"]["ups vs ups:noremask"]] == ["er_untrained"] * 2
        detection = {(d["model"], d["incorrect_source"]): d for d in result["detection"]}
        assert set(detection) == {("backbone + head", "uniform"), ("backbone + head", "tps"),
                                  ("er_untrained", "uniform"), ("er_untrained", "tps")}
        assert all(d["n_scored"] > 0 and d["layout"] == "sequence" for d in detection.values())
        assert "| er_untrained | sequence (32) | tps |" in text
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == (2 + 4) * 2 * 3
        regraded = {r["source"]: r for r in E.summarise(E.regrade(rows))["results"]}
        for label, by_steps in result["results"].items():
            for steps, cell in by_steps.items():
                assert regraded[f"{label}@{steps}"]["accuracy"] == cell["accuracy"]

        (embedded_remedi / "remask_sft.json").write_text(json.dumps(
            {"train_args": {"layout": "block_diffusion", "block_length": 8, "incorrect_source": "context"}}))
        only = B.main(["--skip_baseline", "--remedi", str(embedded_remedi), str(embedded_remedi),
                       "--remedi_labels", "a", "b", "--remedi_sources", "ups", "--out_dir", str(tmp_path / "only")]
                      + sizes)
    finally:
        torch.set_num_threads(threads)
        (embedded_remedi / "remask_sft.json").unlink(missing_ok=True)
    assert set(only["results"]) == {"a/ups", "b/ups"} and only["paired"]["ups vs tps_prob"] == []
    for steps in ("8", "4"):  # the same model under two labels: the same cells
        a, b = only["results"]["a/ups"][steps], only["results"]["b/ups"][steps]
        assert (a["accuracy"], a["remasks_per_problem"]) == (b["accuracy"], b["remasks_per_problem"])
    assert {(d["model"], d["noise"], d["layout"]) for d in only["detection"]} == {
        (m, n, "block_diffusion") for m in "ab" for n in ("context (as trained)", "tps")}
    assert "backbone + head" not in (tmp_path / "only" / "results.md").read_text()
    assert "[4/4] b: ups @ 4 steps" in capsys.readouterr().err


def test_bad_model_flags_are_refused_before_sampling(tiny, tmp_path):
    with pytest.raises(ValueError, match="--skip_baseline leaves nothing"):
        B.main(["--skip_baseline"])
    with pytest.raises(FileNotFoundError, match="--remedi .*no such folder"):
        B.main(["--skip_baseline", "--remedi", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="--remedi_labels names 1 models but --remedi gives 2"):
        B.main(["--skip_baseline", "--remedi", str(tiny), str(tiny), "--remedi_labels", "x"])
    with pytest.raises(ValueError, match="distinct"):
        B.main(["--skip_baseline", "--remedi", str(tiny), str(tiny)])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match="is no dual-stream RemeDi"):
            B.main(["--skip_baseline", "--remedi", str(tiny), "--device", "cpu", "--n_problems", "1",
                    "--out_dir", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "out").exists()
