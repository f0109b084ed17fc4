"""The embedded default: a generated GSM8K-shaped task, its tokenizer and a tiny backbone, all CPU-sized.

    remedi_patches.embedded.task       the problem generator, splits, prompt format, CLI that writes the data
    remedi_patches.embedded.tokenizer  the sentencepiece tokenizer (train / load)
    assets/                            shipped files (tokenizer/, backbone/)
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

_TASK_NAMES = ("Problem", "TaskConfig", "format_prompt", "generate_problem", "make_split", "write_jsonl")


def __getattr__(name: str):
    # task names resolve lazily, so `python -m remedi_patches.embedded.task` does not import task.py twice
    if name in _TASK_NAMES:
        from remedi_patches.embedded import task

        return getattr(task, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
