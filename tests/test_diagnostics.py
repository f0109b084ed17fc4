"""remedi_patches.diagnostics: trajectory views (mask counts, step changes, revisions), pictures, HTML, and the
UPS incorrect-token detection report."""
import html
import json

import pytest
import torch

from generate import generate
from remedi_patches import diagnostics as D
from remedi_patches.metrics import roc_auc
from remedi_patches.remasking import Trajectory, commit_schedule
from test_eval_tools import tiny  # noqa: F401  (module fixture: tiny SMDM backbone + head)

MASK = 99
PNG = b"\x89PNG\r\n\x1a\n"


def hand_trace() -> D.RowTrace:
    """Answer of 3 tokens, reference [9, 7, 2]: position 0 gets a wrong 5, is re-masked, then gets 9."""
    M = MASK
    states = torch.tensor([[M, M, M], [5, M, M], [M, 7, M], [9, 7, M], [9, 7, 2]])
    return D.RowTrace(states=states, block=[0, 0, 0, 0], step=[0, 1, 2, 3], block_masks=[2, 2, 1, 0], mask_id=MASK)


def text(token: int) -> str:
    return D.MASK_TEXT if token == MASK else f"t{token}"


@pytest.fixture(scope="module")
def run(tiny):  # noqa: F811
    """A real trajectory: the tiny SMDM backbone, 'ups' source, 2 rows of different prompt lengths."""
    from remedi_patches.backbones import load_backbone
    from remedi_patches.modeling_wrappers import load_ups_head

    backbone = load_backbone(tiny)
    head, _ = load_ups_head(tiny / "ups_head.safetensors")
    prompt = torch.tensor([[5, 9, 12, 7, 3, 8], [0, 0, 4, 6, 20, 11]])
    attention_mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    trajectory = Trajectory(keep_tokens=True)
    torch.manual_seed(0)
    out = generate(backbone.model, prompt, attention_mask, steps=6, gen_length=12, block_length=6,
                   mask_id=backbone.mask_id, confidence_source="ups", ups_head=head, trajectory=trajectory)
    return backbone, head, trajectory, out


def test_mask_counts_follow_the_schedule_and_never_rise(run):
    backbone, _, trajectory, out = run
    k = commit_schedule(6, 3)  # 2 blocks of 6 positions, 3 steps each
    for row in range(2):
        trace = D.row_trace(trajectory, row, 6, backbone.mask_id)
        counts = D.answer_mask_counts(trace)
        assert counts == [12] + [12 - k_i for k_i in k] + [6 - k_i for k_i in k]
        assert D.is_non_increasing(counts) and counts[-1] == 0
        assert trace.block_masks == [6 - k_i for k_i in k] * 2
        assert torch.equal(trace.states[-1], out[row, 6:])


def test_step_changes_match_the_sampler_record(run):
    backbone, _, trajectory, _ = run
    trace = D.row_trace(trajectory, 1, 6, backbone.mask_id)
    changes = D.step_changes(trace)
    assert len(changes) == len(trajectory.steps) == 6
    for change, rec in zip(changes, trajectory.steps):
        offset = rec.start - 6
        assert [p for p, _ in change.committed] == (rec.committed[1].nonzero().flatten() + offset).tolist()
        assert [p for p, _ in change.remasked] == (rec.remasked[1].nonzero().flatten() + offset).tolist()
        assert change.block_masks == int(rec.mask_count[1])
    assert sum(len(c.committed) - len(c.remasked) for c in changes) == 12
    assert len(D.revisions(trace)) == sum(len(c.remasked) for c in changes)


def test_revisions_classify_against_the_reference():
    trace = hand_trace()
    (rev,) = D.revisions(trace, reference=[9, 7, 2])
    assert (rev.position, rev.old, rev.new, rev.remasked_at, rev.committed_at, rev.kind) == (0, 5, 9, 1, 2, "corrected")
    assert D.revisions(trace, reference=[5, 7, 2])[0].kind == "broken"
    assert D.revisions(trace, reference=[1, 7, 2])[0].kind == "changed"
    assert D.revisions(trace)[0].kind == "changed"
    same = D.RowTrace(torch.tensor([[MASK, MASK], [4, MASK], [MASK, 3], [4, 3]]), [0, 0, 0], [0, 1, 2], [1, 1, 0], MASK)
    assert [r.kind for r in D.revisions(same)] == ["same"]
    cut = D.RowTrace(trace.states[:3], [0, 0], [0, 1], [2, 2], MASK)
    assert [(r.kind, r.committed_at) for r in D.revisions(cut)] == [("open", None)]


def test_row_trace_needs_tokens():
    with pytest.raises(ValueError, match="empty"):
        D.row_trace(Trajectory(keep_tokens=True), 0, 0, MASK)
    trajectory = Trajectory(keep_tokens=False)
    trajectory.record(0, 0, 2, torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool),
                      torch.zeros(1), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="keep_tokens=True"):
        D.row_trace(trajectory, 0, 2, MASK)


def test_pictures_are_written(tmp_path):
    trace = hand_trace()
    curve = D.plot_mask_counts({"ups": trace, "tps_prob": trace}, tmp_path / "masks.png")
    picture = D.plot_trajectory(trace, text, tmp_path / "sub" / "traj.png", reference=[9, 7, 2], title="hand")
    for path in (curve, picture):
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


def test_html_is_self_contained_and_marks_the_correction(tmp_path):
    view = D.TraceView("prompt 0, ups", hand_trace(), text, answer="t9t7t2", reference=[9, 7, 2], verdict=True)
    page = D.trajectory_html([view], intro="steps 4")
    path = D.write_text(tmp_path / "t.html", page)
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert "<script" not in page and "src=" not in page and "http" not in page
    assert page.count("<tr>") == 5  # start + 4 steps
    assert page.count("class='remasked") == 1 and page.count(" corrected'") == 2  # re-masked cell, then fixed cell
    assert "corrected: position 0 't5' re-masked at step 2, then 't9' at step 3" in html.unescape(page)
    assert "step 4 (block 0) (0)" in page


def test_token_texts_show_masks_and_unknown_ids(tiny):  # noqa: F811
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    show = D.token_texts(tokenizer, len(tokenizer))
    assert show(len(tokenizer)) == D.MASK_TEXT
    assert show(len(tokenizer) + 5) == f"<{len(tokenizer) + 5}>"
    assert show(tokenizer.eos_token_id) == tokenizer.eos_token
    ids = D.reference_ids(tokenizer, "3+4=7. #### 7", 16, tokenizer.eos_token_id)
    assert len(ids) == 16 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "3+4=7. #### 7"


@pytest.mark.slow
def test_detection_report_matches_a_direct_computation(run, tmp_path):
    from remedi_patches.embedded.task import make_split
    from remedi_patches.metrics import detection_scores
    from remedi_patches.modeling_wrappers import backbone_forward

    backbone, head, _, _ = run
    records = [{"question": p.question, "answer": p.solution} for p in make_split(12, 0, "test")]
    kw = dict(seq_len=96, r_incorrect=0.5, seed=3)
    report = D.ups_detection_report(backbone, head, records, batch_size=12, **kw)
    c = report.confusion
    assert report.n_scored == c.tp + c.fp + c.tn + c.fn and report.n_incorrect == c.tp + c.fn > 0
    assert 0.0 <= report.auc <= 1.0 and 0.0 <= report.tps_auc <= 1.0
    assert report.to_dict() == D.ups_detection_report(backbone, head, records, batch_size=12, **kw).to_dict()
    batched = D.ups_detection_report(backbone, head, records, batch_size=5, **kw)
    assert batched.n_incorrect == report.n_incorrect and batched.auc == pytest.approx(report.auc, abs=1e-2)

    from remedi_patches import data
    from remedi_patches.noise import apply_remask_noise

    ex = data.build_sft_examples(records, backbone.tokenizer, 96, data.resolve_fields(["question", "answer"]))
    amask = data.answer_mask(ex.prompt_len, 96)
    noise = apply_remask_noise(ex.input_ids, amask, backbone.mask_id, 0.5, len(backbone.tokenizer),
                               D.noise_special_ids(backbone.tokenizer, backbone.mask_id, backbone.eos_id, None),
                               generator=torch.Generator().manual_seed(3))
    logits, hidden = backbone_forward(backbone.model, noise.noisy, None, need_hidden=True)
    scores, labels = detection_scores(head(hidden), noise.incorrect, noise.masked, amask)
    assert report.auc == pytest.approx(roc_auc(scores, labels), abs=1e-9)
    p_there = logits.softmax(-1).gather(-1, noise.noisy.clamp(max=logits.shape[-1] - 1)[..., None])[..., 0]
    assert report.tps_auc == pytest.approx(roc_auc((1 - p_there)[amask & ~noise.masked], labels), abs=1e-6)

    files = D.write_detection_report(report, tmp_path / "det")
    assert files["roc"].read_bytes().startswith(PNG) and files["confusion"].read_bytes().startswith(PNG)
    assert json.loads(files["json"].read_text())["n_scored"] == report.n_scored


def test_detection_without_incorrect_tokens_has_no_auc(run):
    from remedi_patches.embedded.task import make_split

    backbone, head, _, _ = run
    records = [{"question": p.question, "answer": p.solution} for p in make_split(2, 0, "test")]
    report = D.ups_detection_report(backbone, head, records, seq_len=96, r_incorrect=0.0)
    assert report.n_incorrect == 0 and report.to_dict()["auc"] is None
    with pytest.raises(ValueError, match="threshold"):
        D.ups_detection_report(backbone, head, records, threshold=1.0)


def test_detection_settings_follow_the_head_meta():
    meta = {"prompt_template": "Q: {question}\nA:",
            "train_args": {"seq_len": 64, "r_incorrect": 0.3, "incorrect_source": "tps", "prompt_template": None}}
    got = D.detection_settings(meta)
    assert got["prompt_template"] == meta["prompt_template"]
    assert (got["seq_len"], got["r_incorrect"], got["incorrect_source"]) == (64, 0.3, "tps")
    got = D.detection_settings(meta, seq_len=32, r_incorrect=0.0, incorrect_source="uniform")
    assert (got["seq_len"], got["r_incorrect"], got["incorrect_source"]) == (32, 0.0, "uniform")
    assert D.detection_settings({}) == {"seq_len": 128, "r_incorrect": 0.1, "incorrect_source": "uniform",
                                        "prompt_template": None}  # None: data.render_prompt's default


def test_detection_report_with_tps_incorrect_tokens(run):
    from remedi_patches.embedded.task import make_split

    backbone, head, _, _ = run
    records = [{"question": p.question, "answer": p.solution} for p in make_split(6, 0, "test")]
    kw = dict(seq_len=96, r_incorrect=0.5, seed=3)
    tps = D.ups_detection_report(backbone, head, records, batch_size=6, incorrect_source="tps", **kw)
    uniform = D.ups_detection_report(backbone, head, records, batch_size=6, **kw)
    assert tps.settings["incorrect_source"] == "tps" and uniform.settings["incorrect_source"] == "uniform"
    assert (tps.n_incorrect, tps.n_scored) == (uniform.n_incorrect, uniform.n_scored) and tps.n_incorrect > 0
    assert tps.tps_auc != uniform.tps_auc  # other incorrect tokens, same positions
    batched = D.ups_detection_report(backbone, head, records, batch_size=4, incorrect_source="tps", **kw)
    assert batched.n_incorrect == tps.n_incorrect and batched.tps_auc == pytest.approx(tps.tps_auc, abs=1e-2)
    with pytest.raises(ValueError, match="incorrect_source"):
        D.ups_detection_report(backbone, head, records, incorrect_source="junk")
