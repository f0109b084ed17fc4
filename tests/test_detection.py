"""remedi_patches.detection: the ONE held-out incorrect-token detection measurement (trainer log == report), its
report files and its CLI."""
import json

import pytest
import torch

from cli_helpers import assert_user_error, run_cli, unchanged
from remedi_patches import data
from remedi_patches import detection as D
from remedi_patches.embedded.task import make_split
from remedi_patches.losses import tps_loss, ups_labels, ups_loss
from remedi_patches.metrics import detection_scores, roc_auc
from remedi_patches.modeling_wrappers import backbone_forward
from remedi_patches.noise import apply_remask_noise, noise_special_ids

PNG = b"\x89PNG\r\n\x1a\n"
SEQ_LEN = 96


@pytest.fixture(scope="module")
def model(tiny):
    """(backbone, head): the tiny SMDM backbone and its random linear UPS head."""
    from remedi_patches.backbones import load_backbone
    from remedi_patches.modeling_wrappers import load_ups_head

    head, _ = load_ups_head(tiny / "ups_head.safetensors")
    return load_backbone(tiny), head


def held_out(n: int) -> list[dict]:
    return [{"question": p.question, "answer": p.solution} for p in make_split(n, 0, "test")]


def trainer_style(backbone, head, records, settings: D.DetectionSettings) -> dict:
    """What the trainer's held-out evaluation does: its own rows (build_sft_examples), its own noise ids, Fabric's
    autocast and device, the backbone left in train mode by the training loop; the metrics.csv figures."""
    tokenizer = backbone.tokenizer
    examples = data.build_sft_examples(records, tokenizer, SEQ_LEN, data.resolve_fields(["question", "answer"]))
    special = noise_special_ids(tokenizer, backbone.mask_id, backbone.eos_id, backbone.eot_id)
    backbone.model.train()
    head.train()
    try:
        result = D.measure_detection(backbone.model, head, examples, mask_id=backbone.mask_id,
                                     vocab_size=len(tokenizer), special_ids=special, settings=settings,
                                     autocast=lambda: torch.autocast("cpu", enabled=False), device="cpu")
        assert backbone.model.training and head.training  # the training modes come back
    finally:
        backbone.model.eval()
        head.eval()
    return result.metrics()


@pytest.mark.parametrize("source", ["uniform", "tps"])
def test_trainer_and_report_make_one_measurement_for_any_batch_size(model, source):
    backbone, head = model
    records = held_out(12)
    report = D.ups_detection_report(backbone, head, records, seq_len=SEQ_LEN, r_incorrect=0.5, seed=3,
                                    batch_size=12, incorrect_source=source)
    assert report.n_incorrect > 0 and 0.0 < report.auc < 1.0
    for batch_size in (1, 5, 12):
        logged = trainer_style(backbone, head, records, D.DetectionSettings(
            r_incorrect=0.5, incorrect_source=source, seed=3, batch_size=batch_size))
        assert logged["eval_auc"] == pytest.approx(report.auc, abs=1e-12)
        assert logged["eval_tps_auc"] == pytest.approx(report.tps_auc, abs=1e-12)
        assert (logged["eval_incorrect_tokens"], logged["eval_scored_tokens"]) == (report.n_incorrect,
                                                                                   report.n_scored)
        assert (logged["eval_precision"], logged["eval_recall"]) == (report.confusion.precision,
                                                                      report.confusion.recall)
        assert logged["eval_tps_loss"] == pytest.approx(report.tps_loss, rel=1e-5)
        assert logged["eval_ups_loss"] == pytest.approx(report.ups_loss, rel=1e-5)
    other_seed = D.ups_detection_report(backbone, head, records, seq_len=SEQ_LEN, r_incorrect=0.5, seed=4,
                                        incorrect_source=source)
    assert other_seed.auc != report.auc  # the seed is the noise


@pytest.mark.slow
def test_training_log_and_report_give_the_same_auc(model, tiny, tmp_path, capsys):
    """The real trainer (remedi_patches.remask_sft) logs eval_auc on its held-out rows; the report CLI on the saved
    head, the same rows (--split test, --max_samples) and the training seed gives the same figures."""
    from remedi_patches.remask_sft import RemaskConfig, run

    backbone, _ = model
    cfg = RemaskConfig(model_name=str(tiny), dataset="embedded", max_records=32, eval_split="test", eval_samples=8,
                       seq_len=SEQ_LEN, batch_size=4, max_steps=2, lr=1e-2, r_incorrect=0.5, eval_every=0,
                       save_every=0, out_dir=str(tmp_path / "run"), accelerator="cpu", precision="32-true", seed=5)
    logged = run(cfg, backbone=backbone)
    assert logged["eval_incorrect_tokens"] > 0
    got = D.main(["--ups_head", logged["head_path"], "--model_name", str(tiny), "--dataset", "embedded", "--split",
                  "test", "--max_samples", "8", "--seed", "5", "--batch_size", "3", "--device", "cpu",
                  "--out_dir", str(tmp_path / "report")])
    assert (got["n_incorrect"], got["n_scored"]) == (logged["eval_incorrect_tokens"], logged["eval_scored_tokens"])
    assert got["auc"] == pytest.approx(logged["eval_auc"], abs=1e-12)
    assert got["tps_auc"] == pytest.approx(logged["eval_tps_auc"], abs=1e-12)
    assert got["tps_loss"] == pytest.approx(logged["eval_tps_loss"], rel=1e-5)
    assert got["ups_loss"] == pytest.approx(logged["eval_ups_loss"], rel=1e-5)
    assert got["confusion"]["precision"] == logged["eval_precision"]


def test_report_matches_a_direct_computation(model, tmp_path):
    backbone, head = model
    records = held_out(12)
    report = D.ups_detection_report(backbone, head, records, seq_len=SEQ_LEN, r_incorrect=0.5, seed=3,
                                    batch_size=5)
    c = report.confusion
    assert report.n_scored == c.tp + c.fp + c.tn + c.fn and report.n_incorrect == c.tp + c.fn > 0
    assert report.settings["records"] == report.n_rows == 12 and report.settings["seq_len"] == SEQ_LEN

    tokenizer = backbone.tokenizer
    ex = data.build_sft_examples(records, tokenizer, SEQ_LEN, data.resolve_fields(["question", "answer"]))
    amask = data.answer_mask(ex.prompt_len, SEQ_LEN)
    noise = apply_remask_noise(ex.input_ids, amask, backbone.mask_id, 0.5, len(tokenizer),
                               noise_special_ids(tokenizer, backbone.mask_id, backbone.eos_id, None),
                               generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, hidden = backbone_forward(backbone.model, noise.noisy, None, need_hidden=True)
        h = head(hidden)
    scores, labels = detection_scores(h, noise.incorrect, noise.masked, amask)
    assert report.auc == pytest.approx(roc_auc(scores, labels), abs=1e-9)
    p_there = logits.softmax(-1).gather(-1, noise.noisy.clamp(max=logits.shape[-1] - 1)[..., None])[..., 0]
    assert report.tps_auc == pytest.approx(roc_auc((1 - p_there)[amask & ~noise.masked], labels), abs=1e-6)
    assert report.tps_loss == pytest.approx(
        tps_loss(logits, ex.input_ids, noise.masked, noise.p_mask, ex.answer_len).item(), rel=1e-5)
    labels_ups = ups_labels(logits, ex.input_ids, noise.noisy, noise.masked, noise.incorrect)
    assert report.ups_loss == pytest.approx(ups_loss(h, labels_ups, amask).item(), rel=1e-5)

    files = D.write_detection_report(report, tmp_path / "det")
    assert files["roc"].read_bytes().startswith(PNG) and files["confusion"].read_bytes().startswith(PNG)
    written = json.loads(files["json"].read_text())
    assert written["n_scored"] == report.n_scored and written["auc"] == report.auc


def test_tps_incorrect_tokens_change_the_tokens_not_the_positions(model):
    backbone, head = model
    records = held_out(6)
    kw = dict(seq_len=SEQ_LEN, r_incorrect=0.5, seed=3)
    tps = D.ups_detection_report(backbone, head, records, incorrect_source="tps", **kw)
    uniform = D.ups_detection_report(backbone, head, records, **kw)
    assert tps.settings["incorrect_source"] == "tps" and uniform.settings["incorrect_source"] == "uniform"
    assert (tps.n_incorrect, tps.n_scored) == (uniform.n_incorrect, uniform.n_scored) and tps.n_incorrect > 0
    assert tps.tps_auc != uniform.tps_auc  # other incorrect tokens, same positions


def test_detection_without_incorrect_tokens_has_no_auc(model):
    backbone, head = model
    report = D.ups_detection_report(backbone, head, held_out(2), seq_len=SEQ_LEN, r_incorrect=0.0)
    assert report.n_incorrect == 0 and report.to_dict()["auc"] is None


@pytest.mark.parametrize("bad, fragment", [(dict(threshold=1.0), "--threshold"), (dict(batch_size=0), "--batch_size"),
                                           (dict(incorrect_source="junk"), "--incorrect_source"),
                                           (dict(r_incorrect=1.5), "--r_incorrect"), (dict(t=2.0), "--t ")])
def test_bad_settings_are_refused(bad, fragment):
    with pytest.raises(ValueError, match=fragment):
        D.DetectionSettings(**bad)


def test_detection_settings_follow_the_head_meta():
    meta = {"prompt_template": "Q: {question}\nA:",
            "train_args": {"seq_len": 64, "r_incorrect": 0.3, "incorrect_source": "tps", "eps": 0.01,
                           "prompt_template": None}}
    got = D.detection_settings(meta)
    assert got["prompt_template"] == meta["prompt_template"]
    assert (got["seq_len"], got["r_incorrect"], got["incorrect_source"], got["eps"]) == (64, 0.3, "tps", 0.01)
    got = D.detection_settings(meta, seq_len=32, r_incorrect=0.0, incorrect_source="uniform", eps=0.1)
    assert (got["seq_len"], got["r_incorrect"], got["incorrect_source"], got["eps"]) == (32, 0.0, "uniform", 0.1)
    assert D.detection_settings({}) == {"seq_len": 128, "r_incorrect": 0.1, "incorrect_source": "uniform",
                                        "eps": 1e-3, "prompt_template": None}  # None: data.render_prompt's default


def test_cli_writes_the_report(tiny, tmp_path, capsys):
    out = tmp_path / "report"
    got = D.main(["--ups_head", str(tiny / "ups_head.safetensors"), "--model_name", str(tiny), "--max_samples",
                  "6", "--seq_len", str(SEQ_LEN), "--r_incorrect", "0.5", "--device", "cpu", "--out_dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "detection.json", "roc.png"]
    assert json.loads((out / "detection.json").read_text()) == got
    assert got["settings"]["r_incorrect"] == 0.5 and got["settings"]["incorrect_source"] == "uniform"
    assert got["n_rows"] == 6 and "wrote" in capsys.readouterr().out


def test_cli_checks_flags_before_loading_the_model(tiny, tmp_path, monkeypatch):
    from remedi_patches.model_args import ModelSpec

    def no_load(self):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(ModelSpec, "load", no_load)
    head = str(tiny / "ups_head.safetensors")
    for flags, fragment in [(["--threshold", "1.5"], "--threshold"), (["--max_samples", "0"], "--max_samples"),
                            (["--r_incorrect", "2"], "--r_incorrect"), (["--seq_len", "0"], "--seq_len")]:
        with pytest.raises(ValueError, match=fragment):
            D.main(["--ups_head", head, "--model_name", str(tiny), *flags])
    with pytest.raises(ValueError, match="--batch_size"):  # before the head file is read, too
        D.main(["--ups_head", str(tmp_path / "no_head.safetensors"), "--batch_size", "0"])
    with pytest.raises(ValueError, match="--ups_head is required"):
        D.main(["--model_name", str(tiny)])


def test_cli_missing_head_is_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "detection.json").write_text("{}\n")
    with unchanged(out):
        result = run_cli(["-m", "remedi_patches.detection", "--ups_head", str(tmp_path / "missing_head.safetensors"),
                          "--out_dir", str(out)])
    assert_user_error(result, "missing_head.safetensors")
