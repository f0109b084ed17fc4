"""Faults and bad input in the trainers, as a user meets them: a run that diverges stops with one clear line and
leaves only finite checkpoints (and no head / export); a second run on the same output refuses; bad flags,
missing local paths and unwritable outputs fail before anything loads, leaving existing files as they were."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

import lit_gpt.training as training
from cli_helpers import assert_user_error, run_cli, unchanged
from lit_gpt.training import TrainingDiverged, latest_checkpoint, nonfinite_tensors
from trainer_helpers import make_char_tokenizer, mdm_args, train_mdm, write_pattern_data

pytestmark = pytest.mark.usefixtures("one_thread")

MDM, SFT, REMEDI = "SMDM/pretrain/train_mdm.py", "SMDM/sft/train_sft.py", "SMDM/pretrain/train_remedi.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_pattern_data(tmp_path_factory.mktemp("packed"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A healthy 3-step run (checkpoint iter-000006) to resume with a learning rate that ruins it."""
    out = tmp_path_factory.mktemp("healthy")
    train_mdm.main(mdm_args(data, out, max_steps=3, save_interval=3))
    return out


def finite_checkpoint(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    assert not nonfinite_tensors(ckpt["model"]) and not nonfinite_tensors(ckpt["optimizer"]["state"])
    return ckpt


def resume_args(data, out, **kw):
    return mdm_args(data, out, max_steps=12, save_interval=1, min_lr=0, warmup_steps=0,
                    resume=str(out / "iter-000006-ckpt.pth"), **kw)


def test_nan_loss_stops_with_the_step_and_a_lower_lr_and_keeps_only_finite_checkpoints(data, trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "iter-000006-ckpt.pth").write_bytes((trained / "iter-000006-ckpt.pth").read_bytes())
    with pytest.raises(TrainingDiverged, match=r"stopped at step \d+: the (loss|gradient norm).* is nan.*newest "
                                               r"checkpoint .* is the last good one. Lower the learning rate \(--lr"):
        train_mdm.main(resume_args(data, out, lr=1e30, divergence_factor=0))
    newest = latest_checkpoint(out)
    assert newest.name != "iter-000006-ckpt.pth"  # some updates ran and were saved before the loss broke
    for ckpt in out.glob("iter-*-ckpt.pth"):
        finite_checkpoint(ckpt)
    assert not (out / "final").exists()  # no export of a failed run
    assert not list(out.glob("*.tmp")) and not (out / ".run.lock").exists()


def test_divergence_limit_stops_a_loss_that_explodes(data, trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "iter-000006-ckpt.pth").write_bytes((trained / "iter-000006-ckpt.pth").read_bytes())
    with pytest.raises(TrainingDiverged, match=r"running loss .* grew beyond --divergence_factor 10 x its best"):
        train_mdm.main(resume_args(data, out, lr=100))
    finite_checkpoint(latest_checkpoint(out))


def test_weights_with_nan_are_never_saved(data, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *a, **kw):  # an update that leaves a NaN weight (finite loss and gradients)
        out = real_step(self, *a, **kw)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(TrainingDiverged, match="weights hold NaN/inf after the update .* were not saved"):
        train_mdm.main(mdm_args(data, tmp_path, max_steps=3, save_interval=1))
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "final").exists()


def test_nan_run_through_the_remask_cli_writes_no_head(tmp_path):
    out = tmp_path / "out"
    result = run_cli([REMEDI, "--seq_len", "72", "--batch_size", "4", "--max_steps", "8", "--eval_samples", "0",
                      "--save_every", "1", "--lr", "1e30", "--ups_width", "16", "--accelerator", "cpu",
                      "--out_dir", out])
    assert_user_error(result, "training stopped at step", "lower the learning rate (--lr 1e+30)")
    assert not (out / "ups_head.safetensors").exists()
    for ckpt in out.glob("iter-*-ckpt.pth"):
        state = torch.load(ckpt, weights_only=True)
        assert not nonfinite_tensors(state["head"]) and not nonfinite_tensors(state["opt_head"]["state"])


def test_a_checkpoint_holding_nan_is_refused_at_resume(data, trained, tmp_path):
    ckpt = torch.load(trained / "iter-000006-ckpt.pth", weights_only=True)
    next(iter(ckpt["model"].values())).view(-1)[0] = float("nan")
    torch.save(ckpt, tmp_path / "iter-000006-ckpt.pth")
    with pytest.raises(ValueError, match=r"iter-000006-ckpt.pth holds NaN/inf values .*delete it"):
        train_mdm.main(mdm_args(data, tmp_path, max_steps=4))


def test_second_run_on_the_same_out_dir_refuses(data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "iter-000006-ckpt.pth").write_bytes(b"a checkpoint of the running job")
    (out / ".run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # a live holder
    with unchanged(out):
        result = run_cli([MDM, *mdm_args(data, out)])
    assert_user_error(result, "in use by another run", f"pid {os.getpid()}")


def test_second_run_writing_the_same_head_refuses(tmp_path):
    from remedi_patches.remask_sft import RemaskConfig, run

    head = tmp_path / "heads" / "ups_head.safetensors"
    head.parent.mkdir()
    head.write_bytes(b"the head another run is writing")
    (head.parent / ".ups_head.safetensors.lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))
    with unchanged(head.parent), pytest.raises(ValueError, match="ups_head.safetensors is in use by another run"):
        run(RemaskConfig(save_path=str(head), out_dir=str(tmp_path / "out"), accelerator="cpu"))
    assert not (tmp_path / "out" / ".run.lock").exists()  # nothing held after the refusal


def test_resume_lists_changed_settings(data, trained, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "iter-000006-ckpt.pth").write_bytes((trained / "iter-000006-ckpt.pth").read_bytes())
    train_mdm.main(mdm_args(data, out, max_steps=4, save_interval=3, seq_len=12))
    text = capsys.readouterr().out
    assert "Warning: resuming" in text and "max_steps: 3 -> 4" in text and "seq_len: 16 -> 12" in text


def test_checkpoint_temporary_files_are_unique_per_process(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(src).name), real_replace(src, dst)))
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    training.save_checkpoint(fabric, tmp_path / "iter-000001-ckpt.pth", {"x": torch.ones(1)})
    training.save_checkpoint(fabric, tmp_path / "iter-000001-ckpt.pth", {"x": torch.ones(1)})
    assert len(set(renamed)) == 2 and all(n.startswith(f"iter-000001-ckpt.pth.{os.getpid()}-") and n.endswith(".tmp")
                                          for n in renamed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-000001-ckpt.pth"]


# ---------------------------------------------------------------- bad input through each CLI (subprocess)


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sft_in")
    make_char_tokenizer(root / "tok")
    (root / "train.jsonl").write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    return root / "tok", root / "train.jsonl"


def cli_args(cli: str, data: Path, sft_inputs, out: Path, **kw) -> list[str]:
    if cli == MDM:
        return [MDM, *mdm_args(data, kw.pop("out_dir", out), **kw)]
    tok, dataset = sft_inputs
    base = {"model_name": "Diff_LLaMA_tiny", "vocab_size": 64, "tokenizer": tok, "dataset": dataset, "seq_len": 16,
            "micro_batch_size": 2, "global_batch_size": 2, "max_steps": 2, "accelerator": "cpu", "out_dir": out} \
        if cli == SFT else {"max_steps": 2, "eval_samples": 0, "seq_len": 72, "accelerator": "cpu", "out_dir": out}
    base.update(kw)
    return [cli, *[x for k, v in base.items() for x in (f"--{k}", str(v))]]


BAD_INPUT = {  # class -> (flag overrides, fragments of the one error line); "{file}" is an existing plain file
    "bad_value": ({"lr": "-1"}, ["--lr", "positive"]),
    "missing_path": ({"train_data_dir": "./no_such_data"}, ["--train_data_dir", "no_such_data", "does not exist"]),
    "unwritable_output": ({"out_dir": "{file}/out"}, ["--out_dir", "not a writable folder"]),
}
PER_CLI = {
    SFT: {"missing_path": ({"dataset": "./no_such.jsonl"}, ["--dataset", "no_such.jsonl", "does not exist"])},
    REMEDI: {"bad_value": ({"batch_size": "0"}, ["--batch_size", ">= 1"]),
             "missing_path": ({"model_name": "./no_such_model"}, ["--model_name", "no_such_model", "does not exist"]),
             "unwritable_output": ({"save_path": "{file}/head.safetensors"}, ["--save_path", "not a writable"])},
}


@pytest.mark.parametrize("cli", [MDM, SFT, REMEDI])
@pytest.mark.parametrize("kind", ["bad_value", "missing_path", "unwritable_output"])
def test_bad_input_is_one_line_before_anything_loads(cli, kind, data, sft_inputs, tmp_path):
    flags, fragments = PER_CLI.get(cli, {}).get(kind, BAD_INPUT[kind])
    plain_file = tmp_path / "plain.txt"
    plain_file.write_text("not a folder")
    out = tmp_path / "out"
    out.mkdir()
    (out / "iter-000004-ckpt.pth").write_bytes(b"an earlier run's checkpoint")
    (out / "ups_head.safetensors").write_bytes(b"an earlier head")
    flags = {k: v.replace("{file}", str(plain_file)) for k, v in flags.items()}
    with unchanged(out, plain_file):
        result = run_cli(cli_args(cli, data, sft_inputs, out, **flags), cwd=tmp_path)
    assert_user_error(result, *fragments)
    assert "Loading" not in result.stdout + result.stderr and "Seed set" not in result.stderr  # nothing loaded
