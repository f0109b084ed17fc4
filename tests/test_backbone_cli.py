"""Backbone, head and dataset mistakes through real command lines, as a user meets them: exit 2, one `error:` line
naming the problem (the path, file, line or tensor), no traceback, nothing that existed before changed."""
import json

import pytest
from safetensors.torch import save_file

from cli_helpers import assert_user_error, run_cli, unchanged
from remedi_patches.ups_head import UPSHead

pytestmark = pytest.mark.slow  # each case starts a python with torch (~5 s)

SHORT = ["--steps", "4", "--gen_length", "4", "--block_length", "4", "--device", "cpu"]


def test_missing_local_model_dir_is_not_a_hub_download(tmp_path):
    result = run_cli(["generate.py", "--model", "./missing_dir", *SHORT], cwd=tmp_path)
    line = assert_user_error(result, "missing_dir", "local")
    assert "hub" not in line.lower() or "hub name" in line.lower()  # never "could not download from the hub"


def test_unreachable_hub_name_says_so_and_how_to_pass_a_folder(tmp_path):
    result = run_cli(["generate.py", "--model", "nobody-xyz/no-such-model", *SHORT], cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(result, "nobody-xyz/no-such-model", "hub is unreachable", "local folder")


def test_ups_head_holding_nan_is_refused_naming_file_and_tensor(tmp_path):
    head = UPSHead(64, 0)  # the embedded backbone's hidden size
    tensors = {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}
    tensors["net.0.bias"][0] = float("nan")
    path = tmp_path / "diverged_head.safetensors"
    save_file(tensors, str(path), metadata={"format": "remedi-ups-head",
                                            "meta": json.dumps({"hidden_size": 64, "width": 0})})
    with unchanged(tmp_path):
        result = run_cli(["generate.py", "--ups_head", str(path), "--confidence_source", "ups", *SHORT])
    assert_user_error(result, "diverged_head.safetensors", "net.0.bias", "nan or inf")


def test_train_remedi_bad_dataset_names_the_file_and_line(tmp_path):
    """(The other dataset classes, empty file, malformed JSON, empty rows, are unit tests in test_data.py.)"""
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "c\xff", "answer": "d"}\n')
    out = tmp_path / "out"
    with unchanged(tmp_path):
        result = run_cli(["SMDM/pretrain/train_remedi.py", "--dataset", str(data), "--max_steps", "1",
                          "--out_dir", str(out), "--accelerator", "cpu"])
    assert_user_error(result, "bad.jsonl, line 2", "utf-8")
