"""remedi_patches.trajectory_views: trajectory views (mask counts, step changes, revisions), pictures, HTML."""
import html
import re

import pytest
import torch

from remedi_patches import trajectory_views as D
from remedi_patches.remasking import Trajectory, commit_schedule
from remedi_patches.sampling import generate

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
def run(tiny):
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
    assert page.count("class='remasked") == 1  # the re-masked cell, then the fixed cell, framed as corrected:
    assert len(re.findall(r"class='[a-z ]* corrected[ ']", page)) == 2
    assert "corrected: position 0 't5' re-masked at step 2, then 't9' at step 3" in html.unescape(page)
    assert "step 4 (block 0) (0)" in page


def test_token_texts_show_masks_and_unknown_ids(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    show = D.token_texts(tokenizer, len(tokenizer))
    assert show(len(tokenizer)) == D.MASK_TEXT
    assert show(len(tokenizer) + 5) == f"<{len(tokenizer) + 5}>"
    assert show(tokenizer.eos_token_id) == tokenizer.eos_token
    ids = D.reference_ids(tokenizer, "3+4=7. #### 7", 16, tokenizer.eos_token_id)
    assert len(ids) == 16 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "3+4=7. #### 7"


def test_tokens_committed_at_the_last_step_are_graded_not_blue():
    """With a reference, a token committed at a step is filled right / wrong like any kept token (the commit is a
    frame), so the final row reads as the graded answer; without a reference it stays `committed`."""
    trace = hand_trace()  # the last step commits the right 2 at position 2
    last = trace.num_steps
    assert [D._cell_kind(trace, last, p, [9, 7, 2]) for p in range(3)] == ["right", "right", "right"]
    assert [D._cell_kind(trace, last, p, [9, 7, 3]) for p in range(3)] == ["right", "right", "wrong"]
    assert D._cell_kind(trace, 1, 0, [9, 7, 2]) == "wrong"  # the wrong 5 committed at step 1
    assert [D._cell_kind(trace, last, p, None) for p in range(3)] == ["kept", "kept", "committed"]
    page = D.trajectory_html([D.TraceView("p", trace, text, reference=[9, 7, 2])])
    final_row = page.split("<tr>")[-1]
    assert f"background:{D.COLOURS['committed']}'" not in final_row and "class='right new'" in final_row
    assert f"background:{D.COLOURS['right']}" in final_row


def test_step_lines_and_trajectory_text_show_the_tokens(run, tiny):
    from transformers import AutoTokenizer

    lines = D.step_lines(hand_trace(), text)
    assert len(lines) == 4
    assert "committed +0:'t5'" in lines[0] and "re-masked -0:'t5'" in lines[1] and "+1:'t7'" in lines[1]
    assert "masks 0 in block, 0 in answer | committed +2:'t2' | re-masked -" in lines[3]
    backbone, _, trajectory, out = run
    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    shown = D.trajectory_text(trajectory, 6, tokenizer, backbone.mask_id)
    rows = shown.split("row 1:\n")
    assert rows[0].startswith("row 0:\n") and len(rows) == 2
    steps, cost = rows[1].rsplit("\n", 1)
    assert steps.count("\n") == 5 and "committed +" in rows[1]
    assert cost == f"cost: {trajectory.cost()}" and cost.startswith("cost: NFE 6, ")  # 6 forwards, one call
    first_token = D.token_texts(tokenizer, backbone.mask_id)(int(out[1, 6]))
    assert f":{first_token!r}" in rows[1]
    with pytest.raises(ValueError, match="keep_tokens=True"):
        bare = Trajectory()
        bare.steps = [type(trajectory.steps[0])(**{**trajectory.steps[0].__dict__, "tokens": None})]
        D.trajectory_text(bare, 6, tokenizer, backbone.mask_id)


def test_trajectory_text_without_a_counted_call_has_no_cost_line(run, tiny):
    from transformers import AutoTokenizer

    backbone, _, trajectory, _ = run
    uncounted = Trajectory(keep_tokens=True)
    uncounted.steps = trajectory.steps
    shown = D.trajectory_text(uncounted, 6, AutoTokenizer.from_pretrained(str(tiny)), backbone.mask_id)
    assert "cost:" not in shown and shown.splitlines()[-1].startswith("  step")


def test_decoding_text_shows_the_fast_decoding_settings_that_are_set():
    from remedi_patches.sampling import SamplerSettings

    plain = SamplerSettings(steps=8, gen_length=8, block_length=8)
    assert D.decoding_text(plain, "llada") == "decoding: llada"
    fast = plain.replace(threshold=0.9, cache="dual", cache_interval=4)
    assert D.decoding_text(fast, "llada") == "decoding: llada, cache: dual, cache_interval 4, threshold 0.9"
    assert D.decoding_text(plain.replace(factor=1.0), "block") == "decoding: block, factor 1"
