"""bench/sweep.py: grid parsing and its one-line errors, the points and their names, skipping finished points and
resuming unfinished ones, and a tiny sweep of the embedded model end to end (results.csv / .md, the plot)."""
import csv
import json

import pytest

import sweep as S  # bench/ is on pytest.ini's pythonpath
from cli_helpers import in_process_user_error

TINY = ["--base", "max_steps=2", "--base", "batch_size=4", "--base", "eval_samples=16", "--base", "max_records=64",
        "--base", "accelerator=cpu", "--n_eval", "3", "--steps", "8", "4", "--gen_length", "8", "--block_length", "8"]


def test_grid_values_take_the_trainers_types():
    grid = S.parse_grid(["r_incorrect=0.05, 0.1", "ups_width=0,128", "train_mode=ups_only,full",
                         "gradient_checkpointing=true,0", "lambda_ups=none,2"])
    assert grid == {"r_incorrect": [0.05, 0.1], "ups_width": [0, 128], "train_mode": ["ups_only", "full"],
                    "gradient_checkpointing": [True, False], "lambda_ups": [None, 2.0]}
    assert type(grid["ups_width"][0]) is int and type(grid["lambda_ups"][1]) is float
    assert S.parse_base(["--max_steps=200", "lr=1e-3"], grid, "one_at_a_time") == {"max_steps": 200, "lr": 1e-3}


@pytest.mark.parametrize("argv, fragments", [
    (["--grid", "lamda_ups=0.5,1"], ["'lamda_ups' is no flag of SMDM/pretrain/train_remedi.py",
                                     "did you mean lambda_ups?"]),
    (["--grid", "ups_width=0,wide"], ["--grid ups_width=0,wide", "'wide' is not a value of ups_width (int)"]),
    (["--grid", "train_mode=ups_only,bogus"], ["train_mode must be one of"]),
    (["--grid", "r_incorrect"], ["--grid 'r_incorrect': write NAME=V1,V2,..."]),
    (["--grid", "r_incorrect=0.1,0.1"], ["each value once"]),
    (["--grid", "r_incorrect=0.1", "--grid", "r_incorrect=0.2"], ["names r_incorrect twice"]),
    (["--grid", "out_dir=a,b"], ["out_dir is set by the sweep"]),
    (["--grid", "lr=1e-3,2e-3", "--base", "seed=x"], ["--base seed=x", "'x' is not a value of seed (int)"]),
    (["--mode", "full", "--grid", "lr=1e-3,2e-3", "--base", "lr=1e-3"], ["lr is swept by --grid in full mode"]),
    ([], ["nothing to sweep"]),
    (["--grid", "r_incorrect=0.1,5"], ["sweep point r_incorrect=5", "--r_incorrect"]),  # the trainer's own check
    (["--grid", "lr=1e-3", "--eval_split", "train"], ["--eval_split train is the split the trainer trains on"]),
    (["--grid", "lr=1e-3", "--steps", "64"], ["steps=64 > gen_length=32"]),
])
def test_bad_input_is_one_line_naming_it(argv, fragments, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "run", lambda cfg: pytest.fail(f"trained {cfg.out_dir}"))
    line = in_process_user_error(S.main, argv + ["--out_dir", str(tmp_path / "sweep")], capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "sweep").exists()  # checked before anything ran


def test_points_and_names():
    grid = {"r_incorrect": [0.05, 0.1, 0.2], "lambda_ups": [0.5, 1.0], "ups_width": [0, 128, 512]}
    points = S.make_points(grid, {}, "one_at_a_time")  # base: r 0.1, lambda 1, width 128 (the embedded recipe)
    assert [S.point_name(p) for p in points] == ["base", "r_incorrect=0.05", "r_incorrect=0.2", "lambda_ups=0.5",
                                                  "ups_width=0", "ups_width=512"]
    points = S.make_points(grid, {"lambda_ups": 2.0}, "one_at_a_time")  # a base value outside the grid
    assert [S.point_name(p) for p in points][:4] == ["base", "r_incorrect=0.05", "r_incorrect=0.2", "lambda_ups=0.5"]
    assert "lambda_ups=1" in [S.point_name(p) for p in points]
    full = S.make_points({"r_incorrect": [0.05, 0.2], "lambda_ups": [0.5, 1.0]}, {}, "full")
    assert [S.point_name(p) for p in full] == ["r_incorrect=0.05__lambda_ups=0.5", "r_incorrect=0.05__lambda_ups=1",
                                               "r_incorrect=0.2__lambda_ups=0.5", "r_incorrect=0.2__lambda_ups=1"]
    assert S.point_name({"dataset": "data/s1k.jsonl"}) == "dataset=data_s1k.jsonl"


def test_finished_points_are_skipped_and_unfinished_ones_resumed(tmp_path, monkeypatch, capsys):
    """point.json: skipped; train.json alone: evaluated without training; neither: trained with --resume auto in
    its own folder (the trainer continues from the newest checkpoint there); other settings: refused."""
    trained, decoded = [], []

    def fake_run(cfg):
        trained.append((cfg.out_dir, cfg.resume, cfg.r_incorrect))
        return {"updates": 2, "eval_auc": cfg.r_incorrect, "eval_tps_auc": 0.9, "head_path": None, "losses": [1.0]}

    def fake_decode(spec, items, sources, budgets, args):
        decoded.append(spec.model_name)
        return [], {s: {f"accuracy@{b}": 0.5 for b in budgets} for s in sources}

    monkeypatch.setattr(S, "run", fake_run)
    monkeypatch.setattr(S, "decode", fake_decode)
    argv = ["--grid", "r_incorrect=0.1,0.2", "--out_dir", str(tmp_path), "--baseline", "--n_eval", "2"]
    first = S.main(argv)
    assert [(t[0].split("/")[-1], t[1]) for t in trained] == [("base", "auto"), ("r_incorrect=0.2", "auto")]
    assert [r["eval_auc"] for r in first["rows"]] == [0.1, 0.2] and len(decoded) == 2

    trained.clear(), decoded.clear()
    (tmp_path / "points" / "r_incorrect=0.2" / "point.json").unlink()  # killed while evaluating
    second = S.main(argv)
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "eval_seconds"} for r in rows]  # noqa: E731
    assert trained == [] and len(decoded) == 1 and timeless(second["rows"]) == timeless(first["rows"])

    (tmp_path / "points" / "base" / "point.json").unlink()  # killed while training
    (tmp_path / "points" / "base" / "train.json").unlink()
    S.main(argv)
    assert [(t[0].split("/")[-1], t[1]) for t in trained] == [("base", "auto")]

    S.main(argv[:-1] + ["3"])  # other evaluation settings: evaluated again, not trained again
    assert len(trained) == 1 and len(decoded) == 1 + 1 + 2

    line = in_process_user_error(S.main, argv + ["--base", "lr=1e-2"], capsys)
    assert "was written with other trainer settings (lr differ)" in line and "points/base" in line


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, monkeypatch):
    """Two points of the embedded backbone (2 updates each), 3 held-out problems at 2 budgets, the tps_prob
    baseline: results.csv / .md hold every point and source with the held-out AUC and both accuracies (the token
    accuracy the mean of the point's prediction rows), the plot is written, and a re-run trains nothing."""
    out = tmp_path / "sweep"
    result = S.main(["--grid", "r_incorrect=0.1,0.2", "--out_dir", str(out)] + TINY)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["point"], r["source"], r["r_incorrect"]) for r in table] == [
        ("base", "ups", "0.1"), ("r_incorrect=0.2", "ups", "0.2"), ("baseline", "tps_prob", "")]
    for r in table[:2]:
        assert r["updates"] == "2" and 0 <= float(r["eval_auc"]) <= 1 and float(r["train_seconds"]) > 0
        rows = [json.loads(line) for line in (out / "points" / r["point"] / "predictions.jsonl").open()]
        assert sorted({row["steps"] for row in rows}) == [4, 8] and all(row["source"] == "ups" for row in rows)
        for steps in (8, 4):
            mine = [row for row in rows if row["steps"] == steps]
            assert float(r[f"accuracy@{steps}"]) == pytest.approx(sum(row["correct"] for row in mine) / 3)
            assert float(r[f"token_accuracy@{steps}"]) == pytest.approx(sum(row["token_accuracy"] for row in mine) / 3)
    assert table[2]["eval_auc"] == "" and table[2]["train_seconds"] == ""
    text = (out / "results.md").read_text()
    assert ("| point | source | r_incorrect | updates | UPS AUC | 1 - p_TPS AUC | accuracy@8 | token acc.@8 | "
            "p vs base@8 |") in text
    assert 0 <= float(table[1]["p_vs_base@8"]) <= 1 and table[0]["p_vs_base@8"] == ""
    assert "| baseline | tps_prob | - | - | - | - |" in text and "Command: `python bench/sweep.py --grid" in text
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_training(cfg):
        raise AssertionError(f"{cfg.out_dir} trained again")

    monkeypatch.setattr(S, "run", no_training)
    again = S.main(["--grid", "r_incorrect=0.1,0.2", "--out_dir", str(out)] + TINY)
    assert again["rows"] == result["rows"] and again["baseline"] == result["baseline"]


def test_paired_sign_test_against_the_base_point(tmp_path):
    """p_vs_base@S: problems only one of the two solves, by source and budget; the baseline against the base's ups."""
    def write(folder, source, correct, steps=8):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "predictions.jsonl", "a") as f:
            for i, c in enumerate(correct):
                f.write(json.dumps({"index": i, "source": source, "steps": steps, "correct": c}) + "\n")

    base, point, baseline = tmp_path / "base", tmp_path / "p", tmp_path / "baseline"
    write(base, "ups", [True] * 6 + [False] * 2)
    write(point, "ups", [False] * 5 + [True] * 3)  # loses 5 problems, wins 2 (indices 6, 7), ties 1
    write(baseline, "tps_prob", [True] * 6 + [False] * 2)  # ties everywhere
    rows = [{"point": "base", "source": "ups"}, {"point": "p", "source": "ups"},
            {"point": "baseline", "source": "tps_prob"}]
    folders = {"base": base, "p": point, "baseline": baseline}
    got = [r["p_vs_base@8"] for r in S.add_paired(rows, folders, [8], "ups")]
    assert got == [None, pytest.approx(2 * (1 + 7 + 21) / 128), 1.0]
