"""bench/bench_sedd_accuracy.py on a tiny random SEDD and the embedded backbone: the masked-diffusion cell equals
eval_gsm_math.evaluate, the SEDD cell equals sample_rows decoded and graded by hand, one-line errors."""
import json

import pytest
import torch

import bench_sedd_accuracy as B  # bench/ is on pytest.ini's pythonpath
import eval_gsm_math as E
from cli_helpers import assert_user_error, run_cli
from remedi_patches.backbones import load_backbone, load_eval_model
from remedi_patches.sampling import SamplerSettings
from remedi_patches.sedd.answers import decode_ids, encode_prompt, sample_rows
from sedd_helpers import random_sedd

pytestmark = pytest.mark.usefixtures("one_thread")
ROW = 48


@pytest.fixture(scope="module")
def sedd_folder(tmp_path_factory):
    return random_sedd(tmp_path_factory.mktemp("sedd") / "tiny", ROW)


def test_cells_equal_a_direct_computation(sedd_folder, tmp_path):
    argv = ["--sedd", str(sedd_folder), "--llada", "embedded", "--n_problems", "6", "--batch_size", "4",
            "--steps", "3", "--temperatures", "1", "0", "--row_length", str(ROW), "--llada_gen_length", "8",
            "--llada_steps", "4", "--out_dir", str(tmp_path / "bench"), "--no_progress"]
    result = B.main(argv)
    cells = result["cells"]
    assert [(c["kind"], c["n"]) for c in cells] == [("SEDD", 6), ("SEDD", 6), ("masked diffusion", 6)]
    rows = [json.loads(line) for line in (tmp_path / "bench" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and "answer tokens / s" in (tmp_path / "bench" / "results.md").read_text()

    items = B.problems(B.build_parser().parse_args(argv))
    bb = load_backbone(sedd_folder)
    texts, _ = E.item_texts(bb.tokenizer, items)
    g = torch.Generator().manual_seed(0)  # the cell's generator: seed 0, batches of 4 in item order
    for temperature, cell_rows in ((1.0, rows[:6]), (0.0, rows[6:12])):
        g.manual_seed(0)
        outputs = []
        for start in (0, 4):
            prompts = [encode_prompt(bb.tokenizer, t) for t in texts[start:start + 4]]
            out = sample_rows(bb.model, prompts, ROW, steps=3, temperature=temperature, generator=g)
            outputs += [decode_ids(bb.tokenizer, x[len(p):].tolist(), bb.model.config.mask_token_id,
                                   [bb.tokenizer.eos_token_id]) for p, x in zip(prompts, out)]
        assert [r["output"] for r in cell_rows] == outputs
        assert [r["correct"] for r in cell_rows] == [E.grade("gsm8k", o, i.gold)[1] for o, i in zip(outputs, items)]
        assert all(r["nfe"] == 4 for r in cell_rows)  # 3 steps + the denoiser

    em = load_eval_model("embedded", device="cpu")
    settings = SamplerSettings(steps=4, gen_length=8, block_length=8, temperature=0.0)
    want, summary = E.evaluate(em, items, [E.parse_run("upstream")], settings, batch_size=4, seed=0, progress=False)
    assert [r["output"] for r in rows[12:]] == [r["output"] for r in want]
    assert cells[2]["accuracy"] == summary["results"][0]["accuracy"]


def test_one_line_errors(sedd_folder):
    assert_user_error(run_cli(["bench/bench_sedd_accuracy.py", "--steps", "0"]), "--steps")
    assert_user_error(run_cli(["bench/bench_sedd_accuracy.py", "--sedd", "embedded", "--llada", "--n_problems", "1"]),
                      "not a SEDD")
    assert_user_error(run_cli(["bench/bench_sedd_accuracy.py", "--temperatures", "-1"]), "temperature")
