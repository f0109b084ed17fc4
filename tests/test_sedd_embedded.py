"""The embedded SEDD build (remedi_patches.sedd.embedded) at a tiny size: stages, record, loading, sampling."""
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from remedi_patches.backbones import EMBEDDED_SEDD_DIR, load_backbone, load_tokenizer
from remedi_patches.cli import run_main
from remedi_patches.sedd import embedded, load_sedd, sft
from trainer_helpers import load_script

TINY = ["--pretrain_steps", "2", "--sft_steps", "2", "--batch_size", "4", "--n_train", "200", "--hidden_size", "32",
        "--n_blocks", "1", "--n_heads", "2", "--cond_dim", "16"]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("embedded_sedd")
    out = embedded.main(["--work_dir", str(work), *TINY])
    return work, out


def test_build_record(build):
    work, out = build
    assert out == (work / "sedd").resolve()
    record = json.loads((out / "BUILD.json").read_text())
    assert record["command"].startswith("python -m remedi_patches.sedd.embedded --work_dir")
    assert set(record["stage_overrides"]) == {"pretrain", "sft"}
    assert f"sft.text_field={embedded.TEXT_FIELD}" in record["stage_overrides"]["pretrain"]
    assert "training.n_iters=2" in record["stage_overrides"]["sft"]
    assert set(record["timings"]) == {"data_s", "init_s", "pretrain_s", "sft_s"}
    assert all(isinstance(v, float) for v in record["last_train_loss"].values())
    assert record["model"]["tokens"] == 512 and record["parameters"] > 0
    assert (out / "train_log_pretrain.csv").is_file() and (out / "train_log_sft.csv").is_file()


def test_sft_started_from_the_pretraining_export(build):
    work, _ = build
    saved = [str(o) for o in OmegaConf.load(work / "sft" / sft.OVERRIDES_FILE)]
    assert f"sft.pretrained_model={work.resolve() / 'pretrain' / 'model'}" in saved
    saved = [str(o) for o in OmegaConf.load(work / "pretrain" / sft.OVERRIDES_FILE)]
    assert f"sft.pretrained_model={work.resolve() / 'init'}" in saved


def test_pretraining_is_whole_text_mode(build):
    work, _ = build
    s = sft.settings(sft.compose_config(OmegaConf.load(work / "pretrain" / sft.OVERRIDES_FILE)))
    assert sft.resolve_sft_fields([embedded.TEXT_FIELD], s).kind == "text"
    first = json.loads((work / "data" / "pretrain_train.jsonl").open().readline())
    assert list(first) == [embedded.TEXT_FIELD] and first[embedded.TEXT_FIELD].startswith("Question: ")


def test_final_model_loads_with_the_embedded_tokenizer(build):
    _, out = build
    model = load_sedd(out)
    assert model.config.hidden_size == 32 and model.config.tokens == 512 and model.config.graph == "absorb"
    bb = load_backbone(out)
    assert bb.kind == "sedd"
    shipped = load_tokenizer(embedded.tokenizer_dir())
    assert bb.tokenizer.get_vocab() == shipped.get_vocab()
    assert bb.tokenizer.eos_token_id == shipped.eos_token_id


def test_sampler_runs_on_it(build):
    _, out = build
    sample = load_script("SMDM/sedd/sample.py")
    texts = sample.main(["--model", str(out), "--device", "cpu", "--prompt", "Question: Mia has 3 shells.",
                         "--gen_length", "8", "--steps", "4"])
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_resumed_build_skips_finished_stages(build, capsys):
    work, out = build
    embedded.main(["--work_dir", str(work), *TINY])
    assert capsys.readouterr().out.count("done already") == 2
    record = json.loads((out / "BUILD.json").read_text())
    assert all(isinstance(v, float) for v in record["last_train_loss"].values())
    assert record["timings"]["pretrain_s"] is None and record["timings"]["sft_s"] is None  # not run by this call


@pytest.mark.parametrize("bad, words", [(["--n_heads", "3"], "--hidden_size"), (["--sft_steps", "0"], "--sft_steps"),
                                        (["--length", "16"], "--length"),
                                        (["--out_dir", str(EMBEDDED_SEDD_DIR)], "--install"),
                                        (["--install", "--out_dir", "elsewhere"], "--install")])
def test_bad_flags_are_one_error_line(bad, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(embedded.main, ["--work_dir", str(tmp_path), *bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_the_shipped_embedded_sedd_loads_by_name_and_learned_the_task():
    """embedded_sedd (and 'embedded' in the SEDD tools) is the shipped build: its record, its tokenizer, and most of
    10 held-out val problems answered right at temperature 0 (the shipped model gets 8/10; 0.925 on the 200 test
    problems in BENCHMARKS.md section 8)."""
    import bench_sedd_accuracy as B  # bench/ is on pytest.ini's pythonpath
    from remedi_patches.backbones import EMBEDDED_SEDD_DIR
    from remedi_patches.sedd.loading import sedd_model_name

    bb = load_backbone(sedd_model_name("embedded"))
    assert bb.kind == "sedd" and sum(p.numel() for p in bb.model.parameters()) == 1_653_761
    record = json.loads((EMBEDDED_SEDD_DIR / "BUILD.json").read_text())
    assert record["parameters"] == 1_653_761 and record["recipes"]["sft"]["n_iters"] == embedded.SFT_RECIPE.n_iters
    assert bb.tokenizer.get_vocab() == load_tokenizer(embedded.tokenizer_dir()).get_vocab()
    args = B.build_parser().parse_args(["--split", "val", "--n_problems", "10"])
    rows = B.sedd_cell(bb.model, bb.tokenizer, B.problems(args), steps=32, predictor="analytic", temperature=0.0,
                       row_length=B.ROW_LENGTH, batch_size=10, seed=0, label="val", progress=False)
    assert sum(r["correct"] for r in rows) >= 6, [r["output"] for r in rows]
