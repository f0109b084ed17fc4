"""remedi_patches.detection: the ONE held-out incorrect-token detection measurement (trainer log == report), its
report files and its CLI."""
import json

import pytest
import torch

from cli_helpers import assert_user_error, run_cli, unchanged
from remedi_patches import data
from remedi_patches import detection as D
from remedi_patches.block_layout import build_rows
from remedi_patches.embedded.task import make_split
from remedi_patches.losses import tps_loss, ups_labels, ups_loss
from remedi_patches.metrics import detection_scores, roc_auc
from remedi_patches.modeling_wrappers import backbone_forward
from remedi_patches.noise import apply_remask_noise, block_remask_noise, noise_special_ids

PNG = b"\x89PNG\r\n\x1a\n"
SEQ_LEN = 96


@pytest.fixture(scope="module")
def model(tiny):
    """(backbone, head): the tiny SMDM backbone and its random linear UPS head."""
    from remedi_patches.backbones import load_backbone
    from remedi_patches.modeling_wrappers import load_ups_head

    head, _ = load_ups_head(tiny / "ups_head.safetensors")
    return load_backbone(tiny), head


@pytest.fixture(scope="module")
def dual_dir(tiny, tmp_path_factory):
    """The tiny backbone as an untrained dual-stream RemeDi (UPS block after layer 0, random confidence linear)."""
    from remedi_patches.embedded.remedi import build_embedded_remedi

    return build_embedded_remedi(tmp_path_factory.mktemp("dual") / "tiny_remedi", backbone_dir=tiny,
                                 ups_positions=[0])


@pytest.fixture(scope="module")
def dual(dual_dir):
    from remedi_patches.backbones import load_backbone

    return load_backbone(dual_dir)


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
    rows = build_rows(ex.input_ids, ex.prompt_len, ex.answer_tokens, "sequence", 32, backbone.eos_id)
    assert rows.input_ids.shape[1] < SEQ_LEN + 32 and not bool(rows.attention_mask.all())  # batch padding
    amask = rows.answer_mask
    noise = apply_remask_noise(rows.input_ids, amask, backbone.mask_id, 0.5, len(tokenizer),
                               noise_special_ids(tokenizer, backbone.mask_id, backbone.eos_id, None),
                               generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, hidden = backbone_forward(backbone.model, noise.noisy, rows.attention_mask, need_hidden=True)
        h = head(hidden)
    scores, labels = detection_scores(h, noise.incorrect, noise.masked, amask)
    assert report.auc == pytest.approx(roc_auc(scores, labels), abs=1e-9)
    p_there = logits.softmax(-1).gather(-1, noise.noisy.clamp(max=logits.shape[-1] - 1)[..., None])[..., 0]
    assert report.tps_auc == pytest.approx(roc_auc((1 - p_there)[amask & ~noise.masked], labels), abs=1e-6)
    assert report.tps_loss == pytest.approx(
        tps_loss(logits, rows.input_ids, noise.masked, noise.p_mask, rows.answer_len).item(), rel=1e-5)
    labels_ups = ups_labels(logits, rows.input_ids, noise.noisy, noise.masked, noise.incorrect)
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
                                           (dict(r_incorrect=1.5), "--r_incorrect"), (dict(t=2.0), "--t "),
                                           (dict(layout="diagonal"), "--layout"), (dict(block_length=0),
                                                                                   "--block_length"),
                                           (dict(label_smoothing=0.5), "--label_smoothing")])
def test_bad_settings_are_refused(bad, fragment):
    with pytest.raises(ValueError, match=fragment):
        D.DetectionSettings(**bad)


def test_detection_settings_follow_the_head_meta():
    meta = {"prompt_template": "Q: {question}\nA:",
            "train_args": {"seq_len": 64, "r_incorrect": 0.3, "incorrect_source": "tps", "eps": 0.01,
                           "prompt_template": None, "label_smoothing": 0.05, "layout": "block_diffusion",
                           "block_length": 8}}
    got = D.detection_settings(meta)
    assert got["prompt_template"] == meta["prompt_template"]
    assert (got["seq_len"], got["r_incorrect"], got["incorrect_source"], got["eps"]) == (64, 0.3, "tps", 0.01)
    assert (got["label_smoothing"], got["layout"], got["block_length"]) == (0.05, "block_diffusion", 8)
    got = D.detection_settings(meta, seq_len=32, r_incorrect=0.0, incorrect_source="uniform", eps=0.1,
                               label_smoothing=0.0, layout="sequence", block_length=16)
    assert (got["seq_len"], got["r_incorrect"], got["incorrect_source"], got["eps"]) == (32, 0.0, "uniform", 0.1)
    assert (got["label_smoothing"], got["layout"], got["block_length"]) == (0.0, "sequence", 16)
    assert D.detection_settings({"hparams": meta["train_args"]})["layout"] == "block_diffusion"  # a model's meta
    assert D.detection_settings({}) == {"seq_len": 128, "r_incorrect": 0.1, "incorrect_source": "uniform",
                                        "eps": 1e-3, "label_smoothing": 0.0, "layout": "sequence",
                                        "block_length": 32, "prompt_template": None}  # None: render_prompt's default
    settings = D.DetectionSettings(**{k: v for k, v in got.items() if k not in ("seq_len", "prompt_template")})
    assert (settings.layout, settings.block_length) == ("sequence", 16)


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
    with pytest.raises(ValueError, match="--block_length"):
        D.main(["--ups_head", head, "--block_length", "0"])


def test_cli_without_a_ups_refuses_after_loading(tiny, tmp_path):
    with unchanged(tmp_path):
        with pytest.raises(ValueError, match="has no UPS stream, so --ups_head is required"):
            D.main(["--model_name", str(tiny), "--device", "cpu", "--out_dir", str(tmp_path / "report")])


def test_cli_missing_head_is_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "detection.json").write_text("{}\n")
    with unchanged(out):
        result = run_cli(["-m", "remedi_patches.detection", "--ups_head", str(tmp_path / "missing_head.safetensors"),
                          "--out_dir", str(out)])
    assert_user_error(result, "missing_head.safetensors")


# ---------------------------------------------------------------- layouts and the dual-stream RemeDi


def direct_detection(bundle, head, records, layout: str, block_length: int, seed: int, attention: str = "rows"):
    """measure_detection written out for one batch: build_rows, the layout's noise from one generator, one forward
    with the rows' attention mask and positions (attention 'none': no mask, default positions) -> figures."""
    tokenizer = bundle.tokenizer
    ex = data.build_sft_examples(records, tokenizer, SEQ_LEN, data.resolve_fields(["question", "answer"]))
    rows = build_rows(ex.input_ids, ex.prompt_len, ex.answer_tokens, layout, block_length, bundle.eos_id)
    special = noise_special_ids(tokenizer, bundle.mask_id, bundle.eos_id, bundle.eot_id)
    generator = torch.Generator().manual_seed(seed)
    if layout == "block_diffusion":
        noise = block_remask_noise(rows.input_ids, rows.answer_mask, rows.block_index, bundle.mask_id, 0.5,
                                   len(tokenizer), special, generator=generator)
    else:
        noise = apply_remask_noise(rows.input_ids, rows.answer_mask, bundle.mask_id, 0.5, len(tokenizer), special,
                                   generator=generator)
    kwargs = {} if attention == "none" else {"attention_mask": rows.attention_mask}
    if attention != "none" and rows.position_ids is not None:
        kwargs["position_ids"] = rows.position_ids
    with torch.no_grad():
        if head is None:
            logits, h = bundle.model(noise.noisy, **kwargs)  # RemeDiOutput(logits, confidences)
        else:
            logits, hidden = backbone_forward(bundle.model, noise.noisy, kwargs.pop("attention_mask", None),
                                              need_hidden=True, **kwargs)
            h = head(hidden)
    amask = rows.answer_mask
    scores, labels = detection_scores(h, noise.incorrect, noise.masked, amask)
    labels_ups = ups_labels(logits, rows.input_ids, noise.noisy, noise.masked, noise.incorrect)
    return {"auc": roc_auc(scores, labels), "n_incorrect": int(labels.sum()), "n_scored": labels.numel(),
            "ups_loss": ups_loss(h, labels_ups, amask).item(),
            "tps_loss": tps_loss(logits, rows.input_ids, noise.masked, noise.p_mask, rows.answer_len).item()}


@pytest.mark.parametrize("layout", ["sequence", "block_diffusion"])
@pytest.mark.parametrize("which", ["head", "dual"])
def test_measure_detection_equals_a_direct_computation_in_both_layouts(model, dual, layout, which):
    """The UPS of a head or of a dual-stream RemeDi (its confidences, head None), rows of either layout fed with
    build_rows' attention mask and positions: the same figures for any batch size, and other figures when the
    block-causal mask is left out (so the comparison sees the mask)."""
    bundle, head = (model[0], model[1]) if which == "head" else (dual, None)
    records = held_out(10)
    want = direct_detection(bundle, head, records, layout, 8, seed=3)
    assert want["n_incorrect"] > 0
    ex = data.build_sft_examples(records, bundle.tokenizer, SEQ_LEN, data.resolve_fields(["question", "answer"]))
    special = noise_special_ids(bundle.tokenizer, bundle.mask_id, bundle.eos_id, bundle.eot_id)
    for batch_size, eos_id in ((10, bundle.eos_id), (3, None)):  # None: the EOS read from the rows' padding
        got = D.measure_detection(bundle.model, head, ex, mask_id=bundle.mask_id, vocab_size=len(bundle.tokenizer),
                                  special_ids=special, eos_id=eos_id, settings=D.DetectionSettings(
                                      r_incorrect=0.5, seed=3, batch_size=batch_size, layout=layout, block_length=8))
        assert (got.n_incorrect, got.n_scored) == (want["n_incorrect"], want["n_scored"])
        assert got.auc == pytest.approx(want["auc"], abs=1e-9)
        assert got.ups_loss == pytest.approx(want["ups_loss"], rel=1e-5)
        assert got.tps_loss == pytest.approx(want["tps_loss"], rel=1e-5)
        assert (got.settings["layout"], got.settings["block_length"]) == (layout, 8)
    if layout == "block_diffusion":
        unmasked = direct_detection(bundle, head, records, layout, 8, seed=3, attention="none")
        assert unmasked["ups_loss"] != pytest.approx(want["ups_loss"], rel=1e-3)


def test_dual_stream_report_and_the_tps_source(dual):
    """ups_detection_report on a dual-stream RemeDi (head None) with model-sampled incorrect tokens: the same
    positions as uniform noise, other tokens; and the UPS must come from exactly one place."""
    records = held_out(6)
    kw = dict(seq_len=SEQ_LEN, r_incorrect=0.5, seed=3, layout="block_diffusion", block_length=16)
    tps = D.ups_detection_report(dual, None, records, incorrect_source="tps", **kw)
    uniform = D.ups_detection_report(dual, None, records, **kw)
    assert (tps.n_incorrect, tps.n_scored) == (uniform.n_incorrect, uniform.n_scored) and tps.n_incorrect > 0
    assert tps.tps_auc != uniform.tps_auc and 0.0 <= tps.auc <= 1.0
    head = torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match="its own UPS stream"):
        D.ups_detection_report(dual, head, records, **kw)


def test_a_backbone_without_head_is_refused(model):
    backbone, _ = model
    with pytest.raises(ValueError, match="no UPS to measure"):
        D.ups_detection_report(backbone, None, held_out(2), seq_len=SEQ_LEN)


def test_cli_measures_a_dual_stream_model_with_its_training_settings(dual_dir, tmp_path, capsys):
    """No --ups_head: the model's own UPS; layout, block_length and the noise from its remask_sft.json."""
    meta = {"train_args": {"seq_len": SEQ_LEN, "r_incorrect": 0.4, "incorrect_source": "context",
                           "layout": "block_diffusion", "block_length": 16, "label_smoothing": 0.05}}
    (dual_dir / D.MODEL_META_FILE).write_text(json.dumps(meta))
    try:
        got = D.main(["--model", str(dual_dir), "--max_samples", "5", "--device", "cpu", "--out_dir",
                      str(tmp_path / "report")])
    finally:
        (dual_dir / D.MODEL_META_FILE).unlink()
    s = got["settings"]
    assert (s["layout"], s["block_length"], s["incorrect_source"], s["r_incorrect"], s["label_smoothing"],
            s["seq_len"]) == ("block_diffusion", 16, "context", 0.4, 0.05, SEQ_LEN)
    assert s["ups_head"] is None and got["n_rows"] == 5 and got["n_scored"] > 0
    assert D.model_meta(str(dual_dir)) == {} and D.model_meta(None) == {}


def test_rows_beyond_the_context_are_refused(dual):
    """block_diffusion rows hold the answer twice: a seq_len that fits the sequence layout may not fit them."""
    context = dual.model.config.block_size
    records = [{"question": "1 + 1?", "answer": " ".join(["2"] * context)}]
    kw = dict(seq_len=context - 16, r_incorrect=0.5, block_length=16)  # padded to a block: at most the context
    assert D.ups_detection_report(dual, None, records, **kw).n_rows == 1  # sequence: fits
    with pytest.raises(ValueError, match=rf"--layout block_diffusion makes rows of up to \d+ tokens .* context of {context}"):
        D.ups_detection_report(dual, None, records, layout="block_diffusion", **kw)
