"""Every output folder the tools write by default is ignored by git (a run never leaves untracked files)."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def default_outputs() -> list[str]:
    """Default output folders, read from the configs that declare them (plus the tools that are not ours)."""
    from remedi_patches.detection import ReportConfig
    from remedi_patches.embedded import build
    from remedi_patches.remask_sft import RemaskConfig
    from trainer_helpers import train_mdm, train_sft

    ours = [RemaskConfig().out_dir, ReportConfig().out_dir, build.parse_args([]).work_dir,
            train_mdm.MDMConfig().out_dir, train_sft.SFTConfig().out_dir, "out/demo", "out/eval_gsm_math",
            "out/bench_embedded"]
    theirs = ["outputs/default", "tmp", ".cache/opencompass", "icl_inference_output", "lightning_logs"]
    return [str(p) for p in ours] + theirs


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_every_default_output_folder_is_ignored():
    paths = [f"{p}/some_file" for p in default_outputs()]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    ignored = set(done.stdout.split())
    assert [p for p in paths if p not in ignored] == []
    # and nothing the project ships is ignored
    shipped = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert shipped == []
