"""Dataset loader for the offline lm-eval tasks in this folder (`custom_dataset: !function local_data.load_gsm8k`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

SPLITS = ("train", "test")


def load_gsm8k(data_dir: Optional[str] = None, **_metadata):
    """{'train', 'test'} datasets from data_dir/{train,test}.jsonl; data_dir comes from --metadata (lm-eval also
    passes the task's other metadata, e.g. its version, which is not needed here)."""
    import datasets

    if data_dir is None:
        raise ValueError("gsm8k_local needs the data folder: add --metadata '{\"data_dir\": \"/path/to/gsm8k\"}' "
                         "(a folder holding train.jsonl and test.jsonl)")
    files = {split: Path(data_dir) / f"{split}.jsonl" for split in SPLITS}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"gsm8k_local: {missing} not found; data_dir must hold train.jsonl and test.jsonl")
    return datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})
