"""The Gradio app (app.py): the trajectory table's colours for a hand-made trace, the page's settings and their
errors, the streamed steps against a direct sampler call, and the page driven in a real headless Chromium.

The browser test drives the distribution's Chromium (/usr/bin/chromium, `apt-get install chromium`; `make test`
installs it when it is root) through the Python playwright package; playwright's own browser download is never used.
Without that browser it is skipped, except under CI (the env var CI set), where it fails. Its screenshot is saved
to out/test_artifacts/app.png.
"""
import importlib.util
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

from cli_helpers import in_process_user_error
from remedi_patches.confidence import CONFIDENCE_SOURCES
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import SamplerSettings, decode_answers, encode_prompts, sample
from remedi_patches.trajectory_views import COLOURS, MASK_TEXT, RowTrace, row_trace
from trainer_helpers import REPO, load_script

app = load_script("app.py")

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = REPO / "out" / "test_artifacts" / "app.png"
M = 9  # mask id of the hand-made trace


def hand_trace() -> RowTrace:
    """4 answer positions, 3 steps: step 1 commits 0 and 3; step 2 re-masks 0 and commits 1; step 3 commits 0, 2."""
    states = torch.tensor([[M, M, M, M], [1, M, M, 2], [M, 3, M, 2], [4, 3, 5, 2]])
    return RowTrace(states=states, block=[0, 0, 0], step=[0, 1, 2], block_masks=[2, 2, 0], mask_id=M)


def cells(html: str) -> list[tuple[str, str, str]]:
    """(data-kind, background, text) of every cell of a trajectory table, row by row."""
    return re.findall(r"<td class='\w+' data-kind='(\w+)' title='[^']*' style='background:([^']*)'><span>(.*?)</span>",
                      html)


def test_cell_kinds_of_a_hand_made_trace():
    assert app.cell_kinds(hand_trace()) == [
        ["mask", "mask", "mask", "mask"],
        ["committed", "mask", "mask", "committed"],
        ["remasked", "committed", "mask", "kept"],
        ["committed", "kept", "committed", "kept"],
    ]


def test_the_table_colours_each_cell_as_the_trajectory_pictures_and_shows_the_removed_token():
    html = app.steps_html(hand_trace(), lambda t: MASK_TEXT if t == M else str(t))
    got = cells(html)
    assert len(got) == 16 and all(colour == COLOURS[kind] for kind, colour, _ in got)
    assert got[8] == ("remasked", COLOURS["remasked"], "1")  # step 2, position 0: the token it removed
    assert [text for _, _, text in got[12:]] == ["4", "3", "5", "2"]  # the final answer is the last row
    assert [text for _, _, text in got[:4]] == [MASK_TEXT] * 4
    assert "data-steps='3'" in html and "after step 3 (block 0): 2 committed, 0 re-masked, 0 of 4" in html


def test_a_long_run_keeps_its_last_rows_within_the_cell_budget():
    html = app.steps_html(hand_trace(), str, max_cells=8)  # two rows of 4 cells
    assert len(cells(html)) == 8 and "(2 earlier rows not shown)" in html and "<th>step 3 (block 0)</th>" in html
    assert [kind for kind, _, _ in cells(app.start_html(5))] == ["mask"] * 5


def test_the_page_fields_become_sampler_settings_and_bad_ones_say_what_to_fix():
    base = SamplerSettings(steps=32, gen_length=32, block_length=32, ups_temperature=0.0)
    assert app.source_choices() == sorted(CONFIDENCE_SOURCES) + ["upstream"]
    got = app.page_settings(base, "upstream", 8.0, 32, 16, 0.5)
    assert got == base.replace(steps=8, block_length=16, temperature=0.5) and got.confidence_source is None
    assert app.page_settings(base, "ups", 8, 32, 32, 0).confidence_source == "ups"
    with pytest.raises(ValueError, match="steps=7 is not a multiple of the number of blocks 2"):
        app.page_settings(base, "ups", 7, 32, 16, 0)
    with pytest.raises(ValueError, match="steps must be a whole number, got None"):
        app.page_settings(base, "ups", None, 32, 16, 0)
    with pytest.raises(ValueError, match="gen_length must be a whole number, got 2.5"):
        app.page_settings(base, "ups", 8, 2.5, 16, 0)
    with pytest.raises(ValueError, match="temperature is empty"):
        app.page_settings(base, "ups", 8, 32, 16, None)


def test_the_command_line_defaults_and_a_sedd_refused_in_one_line(capsys):
    args = app.build_parser().parse_args([])
    assert (args.model_name, args.host, args.port, args.share) == ("embedded_remedi", "127.0.0.1", 7860, False)
    line = in_process_user_error(app.main, ["--model", "embedded_sedd"], capsys)
    assert "embedded_sedd is a SEDD model" in line and "SMDM/sedd/sample.py" in line
    assert "pass one in 0-65535" in in_process_user_error(app.main, ["--port", "70000"], capsys)


@pytest.fixture(scope="module")
def session():
    return app.load_session(app.build_parser().parse_args(["--device", "cpu"]))


PROMPT = "Tom has 3 apples. He buys 5 more. He gives away 2. How many apples does Tom have now?"
RUN = dict(source="ups", steps=8, gen_length=32, block_length=32, temperature=0)  # re-masks on the embedded RemeDi


@pytest.mark.slow
def test_the_page_streams_one_view_per_step_and_ends_with_the_direct_call(session):
    """One update per denoising step as the sampler records it, then the answer and cost of the call: the same
    tokens as sample() with the same settings and seed, re-masking included."""
    updates = list(session.run(PROMPT, **RUN, seed=0))
    steps = [int(re.search(r"data-steps='(\d+)'", view).group(1)) for view, _, _ in updates]
    trajectory = Trajectory(keep_tokens=True)
    ids, mask = encode_prompts(session.bundle.tokenizer, [PROMPT])
    torch.manual_seed(0)
    settings = session.base.replace(confidence_source="ups", steps=8)
    out = sample(session.bundle, ids, mask, settings, trajectory)
    expected = decode_answers(session.bundle.tokenizer, out, ids.shape[1], session.bundle.stop_ids)[0]
    n = len(trajectory.steps)
    assert steps == [0] + list(range(1, n + 1)) + [n]  # start, each step, then the final view
    assert [answer for _, answer, _ in updates[:-1]] == [""] * (n + 1) and updates[-1][1] == expected
    assert re.fullmatch(r"\(steps 8, gen_length 32, block_length 32\) decoding: block \| NFE \d+, [\d.]+ tokens/s",
                        updates[-1][2])
    text = app.token_texts(session.bundle.tokenizer, session.bundle.mask_id)
    assert updates[-1][0] == app.steps_html(row_trace(trajectory, 0, ids.shape[1], session.bundle.mask_id), text)
    assert "data-kind='remasked'" in updates[-1][0]


def test_bad_page_input_is_refused_before_the_model_runs(session):
    with pytest.raises(ValueError, match="steps=7 is not a multiple"):
        next(session.run(PROMPT, **{**RUN, "steps": 7, "block_length": 16}))
    with pytest.raises(ValueError, match="the prompt is empty"):
        next(session.run("  ", **RUN))
    with pytest.raises(ValueError, match="gen_length 128 does not fit the model's window of 128"):
        next(session.run(PROMPT, **{**RUN, "gen_length": 128, "block_length": 32}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rgb(colour: str) -> str:
    """'#ffb65c' -> 'rgb(255, 182, 92)' (how a browser reports a computed colour)."""
    return "rgb({}, {}, {})".format(*(int(colour[i:i + 2], 16) for i in (1, 3, 5)))


@pytest.fixture
def chromium():
    """The playwright launcher of the distribution's Chromium; skipped without it, except under CI."""
    missing = " and ".join(what for what, ok in ((f"{CHROMIUM} (apt-get install chromium)", CHROMIUM.exists()),
                                                 ("the playwright package (pip install -e '.[app]')",
                                                  _has_playwright())) if not ok)
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, but the browser test lacks {missing}; `make test` installs them (as root)")
        pytest.skip(f"no {missing}: the browser test drives the distribution's Chromium through playwright "
                    "(`make test` installs them as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def _has_playwright() -> bool:
    return importlib.util.find_spec("playwright") is not None


STREAM_WATCH = """() => { window.seenSteps = new Set();
  new MutationObserver(() => { const t = document.querySelector('#trajectory table.steps');
    if (t) window.seenSteps.add(t.dataset.steps); })
  .observe(document.querySelector('#trajectory'), {childList: true, subtree: true}); }"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated",
                            "ignore:The copy keyword is deprecated")  # pandas 3 on gradio's queue
def test_the_page_in_headless_chromium_shows_re_masking_and_the_answer(session, chromium, tmp_path):
    """Type a question, choose 'ups', run 8 steps over 32 tokens (several commits per step, so the UPS re-masks),
    wait for the answer: the table holds re-masked and committed cells in their colours, and it grew step by step.
    A bad setting then shows its one message in the page."""
    port = free_port()
    demo = app.serve(session, "127.0.0.1", port, wait=False)
    try:
        page = chromium.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
        page.locator("#prompt textarea").fill(PROMPT)
        page.locator("#source").get_by_label("ups", exact=True).check()
        for name in ("steps", "gen_length", "block_length"):
            page.locator(f"#{name} input").fill(str(RUN[name]))
        page.evaluate(STREAM_WATCH)
        page.locator("#run").click()
        page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=30_000)
        answer = page.locator("#answer textarea").input_value()
        assert "####" in answer and page.locator("#cost textarea").input_value().startswith("(steps 8, gen_length 32")
        for kind in ("remasked", "committed"):
            found = page.locator(f"#trajectory td[data-kind={kind}]")
            assert found.count() >= 1, kind
            assert found.first.evaluate("e => getComputedStyle(e).backgroundColor") == rgb(COLOURS[kind])
        seen = page.evaluate("[...window.seenSteps].map(Number)")
        assert len(set(seen) - {0}) >= 2, seen  # several intermediate tables were drawn, not only the last
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        shutil.copy(tmp_path / "app.png", ARTIFACT)

        page.locator("#block_length input").fill("16")
        page.locator("#steps input").fill("7")
        page.locator("#run").click()
        error = page.get_by_text("steps=7 is not a multiple of the number of blocks 2")
        error.first.wait_for(timeout=10_000)
        assert "Traceback" not in page.content()
    finally:
        demo.close()
