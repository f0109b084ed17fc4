"""train_pipeline.py / remedi_patches.pipeline: the YAML's checks (one error line naming the key), --dry_run (runs and
writes nothing, lists every stage's command with the hand-offs), one stage alone on the earlier output, a failing
stage, and the shipped embedded chain end to end with tiny settings."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from cli_helpers import REPO, in_process_user_error, run_cli
from remedi_patches.backbones import EMBEDDED_DIR, EMBEDDED_REMEDI_DIR
from remedi_patches.modeling_wrappers import HEAD_FILE_NAME
from remedi_patches.pipeline import KINDS, Product, build_plan, load_config, load_script

train_pipeline = load_script("train_pipeline.py")  # a script of the repo root, not an installed module
EMBEDDED_YAML = REPO / "configs" / "embedded.yaml"
# the shipped chain made tiny: 1-2 updates per stage, a handful of problems (the README runs the same command)
TINY = ["pretrain={max_steps: 2, global_batch_size: 4, micro_batch_size: 4, eval_iters: 1, eval_mc: 1, "
        "save_interval: 2}",
        "sft={max_steps: 2, limit: 16, global_batch_size: 4, micro_batch_size: 4, save_interval: 2}",
        "remask_sft={max_steps: 2, batch_size: 4, max_records: 16, eval_samples: 4, save_every: 2}",
        "rl={max_steps: 1, group_size: 2, prompts_per_step: 2, micro_batch_size: 4, max_records: 4, eval_samples: 0, "
        "save_every: 1}",
        "eval={max_samples: 3, confidence_sources: [ups]}"]
CHAIN = ("pretrain", "sft", "remask_sft", "rl", "eval", "inference")


def sets(*pairs: str) -> list[str]:
    return [w for pair in pairs for w in ("--set", pair)]


def commands(text: str) -> dict[str, list[str]]:
    """stage -> its command's words, from a dry run's or a run's output (`# stage ...` then the command)."""
    found, stage = {}, None
    for line in text.splitlines():
        if line.startswith("# "):
            stage = line[2:].split(":")[0].split(";")[0].strip()
        elif stage and (line.startswith("python ") or line.startswith("$ ")) and stage not in found:
            found[stage] = shlex.split(line.removeprefix("$ "))
    return found


def flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(train_pipeline.subprocess, "Popen", refuse)
    monkeypatch.setattr(train_pipeline.subprocess, "run", refuse)


def write_yaml(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("edit, args, fragments", [
    ({"pretrian": {}}, [], ["pretrian: unknown top-level key", "did you mean pretrain?"]),
    ({"pretraining": {}}, [], ["pretraining: unknown top-level key", "did you mean pretrain?"]),
    ({"sft": {"max_step": 2}}, [], ["sft.max_step: unknown key", "did you mean max_steps?"]),
    ({"sft": {"learning_rat": 0.1}}, [], ["sft.learning_rat: unknown key; did you mean lr?"]),  # the seeds' name
    ({"sft": {"batch_sz": 4}}, [], ["sft.batch_sz: unknown key; did you mean global_batch_size?"]),
    ({"eval": {"qqq": 4}}, [], ["eval.qqq: unknown key; valid keys: ", "max_samples"]),
    ({"sft": {"max_steps": "two"}}, [], ["sft.max_steps: 'two' is not a valid int"]),
    ({"sft": {"max_steps": [1, 2]}}, [], ["sft.max_steps: expected one value"]),
    ({"pretrain": {"accelerator": "tpu"}}, [], ["pretrain.accelerator: 'tpu' is not one of"]),
    ({"remask_sft": {"add_ups_stream": 3}}, [], ["remask_sft.add_ups_stream: expected true or false"]),
    ({"sft": {"eps": 2}}, [], ["sft:", "--eps must be in [0, 1)"]),          # the trainer's own check
    ({"rl": {"group_size": 1}}, [], ["rl:", "--group_size must be >= 2"]),
    ({"eval": {"max_samples": -1}}, [], ["eval:", "max_samples must be >= 0"]),
    ({"sft": {"pretrained_path": "no/such/model"}}, [], ["sft:", "--pretrained_path", "no/such/model"]),
    ({"data": {"datset": "embedded"}}, [], ["data.datset: no stage takes this flag", "did you mean dataset?"]),
    ({"rl": {"enabled": "no"}}, [], ["rl.enabled: expected true or false"]),
    ({"sft": 3}, [], ["sft: expected a mapping"]),
    ({}, ["--set", "sft.max_steps"], ["--set 'sft.max_steps'", "KEY=VALUE"]),
    ({}, ["--set", "sft.max_steps=2", "--stage", "rl", "--prompt", "hi"], ["--prompt goes with --stage inference"]),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys, no_subprocess, edit, args, fragments):
    config = {"out_dir": str(tmp_path / "out"), "pretrain": {}, "sft": {}, "remask_sft": {}, "rl": {}, "eval": {}}
    config.update(edit)
    line = in_process_user_error(train_pipeline.main, ["--config", str(write_yaml(tmp_path, config)), "--dry_run",
                                                       *args], capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "out").exists()


def test_missing_config_and_stage_errors(tmp_path, capsys, no_subprocess):
    line = in_process_user_error(train_pipeline.main, ["--config", str(tmp_path / "nope.yaml")], capsys)
    assert "--config" in line and "nope.yaml" in line and "no such file" in line
    path = write_yaml(tmp_path, {"out_dir": str(tmp_path / "out"), "pretrain": {}, "sft": {}, "rl": {"enabled": False}})
    line = in_process_user_error(train_pipeline.main, ["--config", str(path), "--stage", "eval"], capsys)
    assert "no eval section" in line
    line = in_process_user_error(train_pipeline.main, ["--config", str(path), "--stage", "rl"], capsys)
    assert "rl.enabled is false" in line
    # one stage alone with nothing from the stage before it: the command to run first
    line = in_process_user_error(train_pipeline.main, ["--config", str(path), "--stage", "sft"], capsys)
    assert f"takes pretrain's output {tmp_path / 'out' / 'pretrain' / 'final'}" in line
    assert f"--config {path} --stage pretrain` first, or set sft.pretrained_path" in line
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_every_stage_with_the_hand_offs_and_runs_nothing(tmp_path, capsys, no_subprocess):
    out = tmp_path / "out"
    plans = train_pipeline.main(["--config", str(EMBEDDED_YAML), "--dry_run", *sets(f"out_dir={out}")])
    printed = capsys.readouterr().out
    assert not out.exists()
    cmds = commands(printed)
    assert list(cmds) == list(CHAIN) == [p.name for p in plans]
    assert flag(cmds["sft"], "--pretrained_path") == str(out / "pretrain" / "final")
    assert flag(cmds["remask_sft"], "--model_name") == str(out / "sft" / "final")
    assert flag(cmds["rl"], "--model_name") == str(out / "remask_sft" / "model")
    assert flag(cmds["eval"], "--model") == flag(cmds["inference"], "--model") == str(out / "rl" / "model")
    for stage, words in cmds.items():
        assert words[1] == KINDS[stage].script
        if stage != "inference":
            assert flag(words, "--out_dir") == str(out / stage)
    # round trip: each printed command, parsed by its script's parser, holds the YAML's values
    config = yaml.safe_load(EMBEDDED_YAML.read_text())
    for stage in ("pretrain", "sft", "rl"):
        ns = load_script(KINDS[stage].script).build_parser().parse_args(cmds[stage][2:])
        for key, value in config[stage].items():
            assert getattr(ns, key) == pytest.approx(value) if isinstance(value, float) else getattr(ns, key) == value
        assert ns.seed == config["data"]["seed"]  # the shared block reaches every stage that has the flag


def test_set_overrides_merge_into_the_sections(tmp_path):
    config = load_config(EMBEDDED_YAML, [f"out_dir={tmp_path}", *TINY, "sft.lr=2e-3", "rl.method=rwd"])
    assert config["sft"]["max_steps"] == 2 and config["sft"]["limit"] == 16
    assert config["sft"]["dataset"] == "embedded" and config["sft"]["seq_len"] == 72  # the file's other keys kept
    assert config["rl"]["method"] == "rwd" and config["eval"]["confidence_sources"] == ["ups"]
    plans = {p.name: p for p in build_plan(config)}
    # YAML 1.1 reads 2e-3 as a string; the trainer's parser converts it
    assert flag(plans["sft"].argv, "--max_steps") == "2" and flag(plans["sft"].argv, "--lr") == "2e-3"


def test_disabled_stage_is_bridged_and_a_stage_may_set_its_own_input(tmp_path):
    out = tmp_path / "out"
    config = load_config(EMBEDDED_YAML, [f"out_dir={out}", "remask_sft.enabled=false",
                                         f"sft.pretrained_path={EMBEDDED_DIR}", "pretrain.enabled=false"])
    plans = {p.name: p for p in build_plan(config)}
    assert list(plans) == ["sft", "rl", "eval", "inference"]
    assert plans["sft"].handed == {} and flag(plans["sft"].argv, "--pretrained_path") == str(EMBEDDED_DIR)
    assert plans["rl"].source == "sft" and plans["rl"].handed == {"model_name": str(out / "sft" / "final")}


def test_head_only_remask_sft_hands_on_the_model_and_its_head(tmp_path):
    """ups_only on a single-stream backbone writes a UPS head, not a model: the next stage gets both; RL trains the
    head beside its model, and the evaluation takes that pair."""
    config = load_config(EMBEDDED_YAML, [f"out_dir={tmp_path}", "pretrain.enabled=false", "sft.enabled=false",
                                         "remask_sft.add_ups_stream=false", "remask_sft.recipe=null",
                                         "remask_sft.lr_backbone=null"])
    plans = {p.name: p for p in build_plan(config)}
    head = str(tmp_path / "remask_sft" / "ups_head.safetensors")
    assert plans["remask_sft"].product.ups_head == head and plans["remask_sft"].writes == [head]
    assert plans["rl"].handed == {"model_name": "embedded", "ups_head": head}
    rl_model = tmp_path / "rl" / "model"
    assert plans["eval"].handed == {"model_name": str(rl_model), "ups_head_path": str(rl_model / HEAD_FILE_NAME)}
    config["rl"]["enabled"] = False
    assert {p.name: p for p in build_plan(config)}["eval"].handed == {"model_name": "embedded", "ups_head_path": head}



def test_a_lora_adapter_is_handed_on_beside_its_model_and_head(tmp_path):
    """joint Remask SFT writes a UPS head and a LoRA adapter for the unchanged backbone: RL loads the adapter
    (--load_lora_dir), the evaluation takes the three (--lora_path) when RL is left out."""
    config = load_config(EMBEDDED_YAML, [f"out_dir={tmp_path}", "pretrain.enabled=false", "sft.enabled=false",
                                         "remask_sft.add_ups_stream=false", "remask_sft.recipe=null",
                                         "remask_sft.lr_backbone=null", "remask_sft.train_mode=joint"])
    plans = {p.name: p for p in build_plan(config)}
    head, lora = str(tmp_path / "remask_sft" / "ups_head.safetensors"), str(tmp_path / "remask_sft" / "lora")
    assert plans["remask_sft"].product == Product("embedded", head, lora)
    assert plans["rl"].handed == {"model_name": "embedded", "ups_head": head, "load_lora_dir": lora}
    config["rl"]["enabled"] = False
    assert {p.name: p for p in build_plan(config)}["eval"].handed == {"model_name": "embedded",
                                                                     "ups_head_path": head, "lora_path": lora}

def test_one_stage_alone_takes_the_earlier_output(tmp_path, capsys, no_subprocess):
    out = tmp_path / "out"
    shutil.copytree(EMBEDDED_DIR, out / "pretrain" / "final")  # as if the pretrain stage had run
    train_pipeline.main(["--config", str(EMBEDDED_YAML), "--stage", "sft", "--dry_run", *sets(f"out_dir={out}")])
    cmds = commands(capsys.readouterr().out)
    assert list(cmds) == ["sft"] and flag(cmds["sft"], "--pretrained_path") == str(out / "pretrain" / "final")
    assert sorted(p.name for p in out.iterdir()) == ["pretrain"]


@pytest.mark.slow
def test_failing_stage_stops_the_pipeline_with_one_line(tmp_path):
    """eval alone on a folder that holds no model: the stage fails, the pipeline names it and its log."""
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    path = write_yaml(tmp_path, {"out_dir": str(tmp_path / "out"), "eval": {"model": str(not_a_model)},
                                 "inference": {"model": str(not_a_model)}})
    result = run_cli(["train_pipeline.py", "--config", path])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    log = tmp_path / "out" / "logs" / "eval.log"
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith(f"error: stage eval failed (exit status 2); its output is in {log}")
    assert "error:" in log.read_text() and not (tmp_path / "out" / "logs" / "inference.log").exists()


@pytest.mark.slow
def test_embedded_chain_end_to_end(tmp_path):
    out = tmp_path / "out"
    argv = ["train_pipeline.py", "--config", EMBEDDED_YAML, *sets(f"out_dir={out}", *TINY)]
    result = run_cli(argv, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    cmds = commands(result.stdout)
    assert list(cmds) == list(CHAIN)
    made = {"pretrain": out / "pretrain" / "final", "sft": out / "sft" / "final",
            "remask_sft": out / "remask_sft" / "model", "rl": out / "rl" / "model"}
    for stage, folder in made.items():
        assert (folder / "model.safetensors").is_file() and (folder / "smdm_config.json").is_file(), stage
    assert json.loads((made["remask_sft"] / "smdm_config.json").read_text())["ups_positions"]  # the dual stream
    assert flag(cmds["sft"], "--pretrained_path") == str(made["pretrain"])
    assert flag(cmds["remask_sft"], "--model_name") == str(made["sft"])
    assert flag(cmds["rl"], "--model_name") == str(made["remask_sft"])
    assert flag(cmds["eval"], "--model") == flag(cmds["inference"], "--model") == str(made["rl"])
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["settings"]["max_samples"] == 3 and summary["settings"]["model_name"] == str(made["rl"])
    assert "### answer" in result.stdout  # inference printed its answer
    again = run_cli(argv, timeout=600)  # a re-run skips the finished stages (inference writes nothing: it runs)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [line for line in again.stdout.splitlines() if line.endswith("; skipped")]
    assert [line.split(":")[0].lstrip("# ") for line in skipped] == list(CHAIN[:-1])


def test_inference_stage_takes_the_prompt_and_the_seeds_stage_names(tmp_path, capsys, no_subprocess):
    out = tmp_path / "out"
    shutil.copytree(EMBEDDED_REMEDI_DIR, out / "rl" / "model")  # as if the rl stage had run
    train_pipeline.main(["--config", str(EMBEDDED_YAML), "--stage", "inference", "--prompt", "What is 3 + 4?",
                         "--prompt", "2 * 5 =", "--dry_run", *sets(f"out_dir={out}")])
    words = commands(capsys.readouterr().out)["inference"]
    assert words[words.index("--prompt"):words.index("--prompt") + 4] == ["--prompt", "What is 3 + 4?", "--prompt",
                                                                          "2 * 5 ="]
    assert flag(words, "--model") == str(out / "rl" / "model")
    plans = train_pipeline.main(["--config", str(EMBEDDED_YAML), "--stage", "pretraining", "--dry_run",
                                 *sets(f"out_dir={out}")])
    assert [p.name for p in plans] == ["pretrain"]
