"""Shared helpers of the trainer tests: the trainer scripts as modules (SMDM/pretrain, SMDM/sft and SMDM/scripts are
folders of scripts, not packages, so they are imported once by path for the tests that call their main()
in-process), a character tokenizer saved to a folder, and packed pattern data.

    from trainer_helpers import train_mdm, train_sft, train_remedi, prepare_data
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from lit_gpt.packed_dataset import write_chunk

REPO = Path(__file__).resolve().parents[1]
VOCAB = 24  # pattern data: token ids 0..22, EOS = 23


def load_script(relpath: str) -> ModuleType:
    """Import the script at REPO/relpath as the module named by its file stem (cached in sys.modules)."""
    path = REPO / relpath
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


train_mdm = load_script("SMDM/pretrain/train_mdm.py")
train_sft = load_script("SMDM/sft/train_sft.py")
train_remedi = load_script("SMDM/pretrain/train_remedi.py")
prepare_data = load_script("SMDM/scripts/prepare_data.py")


def make_char_tokenizer(folder: Path, chat_template: bool = False):
    """A character-level transformers tokenizer saved to `folder` (no hub needed)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 +=#.,?:\n")
    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", "<bos>", "<user>", "<bot>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   additional_special_tokens=["<bos>", "<user>", "<bot>"])
    if chat_template:
        fast.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<user>{% else %}<bot>{% endif %}"
                              "{{ m['content'] }}{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
                              "{% if add_generation_prompt %}<bot>{% endif %}")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def write_pattern_data(folder: Path, n_tokens: int = 4096, seed: int = 0, chunk: int = 1024) -> Path:
    """Documents 'k k+1 k+2 ... EOS': easy to learn, so the loss must fall."""
    rng = np.random.default_rng(seed)
    toks = []
    while len(toks) < n_tokens:
        start, length = rng.integers(0, 12), rng.integers(4, 11)
        toks += list(range(start, start + length)) + [VOCAB - 1]
    toks = np.array(toks[:n_tokens], dtype=np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, n_tokens, chunk):
        write_chunk(folder / f"train_{i // chunk:010d}.bin", toks[i:i + chunk])
    return folder


def mdm_args(data: Path, out_dir: Path, **kw) -> list[str]:
    flags = dict(model_name="Diff_LLaMA_tiny", vocab_size=VOCAB, train_data_dir=data, seq_len=16,
                 micro_batch_size=2, global_batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, min_lr=3e-4,
                 save_interval=3, out_dir=out_dir, accelerator="cpu", random_length_prob=0.3)
    flags.update(kw)
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def killed_after_first_save(call) -> None:
    """Run `call()` (a trainer's main or run) until its first checkpoint is written, then die (KeyboardInterrupt) as a
    killed run does."""
    import pytest

    import lit_gpt.training as training

    real_save = training.save_checkpoint

    def save_then_die(fabric, path, state):
        real_save(fabric, path, state)
        raise KeyboardInterrupt("killed after the first checkpoint")

    training.save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        training.save_checkpoint = real_save


def killed_after_first_checkpoint(cfg, load, run=None):
    """killed_after_first_save of a trainer `run(cfg, backbone=...)` (default Remask SFT's
    remedi_patches.remask_sft.run) on the backbone `load()` gives."""
    if run is None:
        from remedi_patches.remask_sft import run

    killed_after_first_save(lambda: run(cfg, backbone=load()))
