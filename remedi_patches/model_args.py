"""Which model bundle a sampling CLI loads (backbone, LoRA adapter, UPS head), declared once for every CLI.

    add_model_args(parser)                         --model/--model_name --smdm_size --tokenizer --ups_head
                                                   --lora_path --mask_id --device (auto) --dtype
    spec = model_spec_from_args(parser.parse_args())   # checked: local paths exist, device and dtype are usable
    bundle = spec.load()                           # remedi_patches.backbones.EvalModel, for sampling.sample()

The seeds' flag `--ups_head` names a FILE; inside, the value is `ups_head_path` (in `generate()`, `ups_head` is
the loaded module). `check()` runs before anything is loaded: a missing local path is reported as a missing
local path, never as a failed hub download.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from remedi_patches.backbones import EvalModel, embedded_folder, load_eval_model
from remedi_patches.cli import add_config_args, arg, config_from_args
from remedi_patches.sources import resolve_source

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: Optional[str]) -> str:
    """'auto' (or None) -> 'cuda' when this torch sees a CUDA device, else 'cpu'; other values unchanged."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


@dataclass(frozen=True)
class ModelSpec:
    """The model bundle to load: backbone, optional LoRA adapter and UPS head, where and in which dtype."""

    model_name: Optional[str] = arg(None, "model folder, SMDM export / .pth checkpoint, or hub name (org/name); "
                                    "None = the embedded tiny model, embedded_remedi = the embedded dual-stream "
                                    "RemeDi", flags=("--model", "--model_name"),
                                    metavar="MODEL")
    smdm_size: Optional[str] = arg(None, "architecture of an SMDM .pth checkpoint, e.g. Diff_LLaMA_170M")
    tokenizer: Optional[str] = arg(None, "tokenizer folder or hub name when the model has none")
    ups_head_path: Optional[str] = arg(None, "UPS head .safetensors (or its folder) written by train_remedi.py; "
                                       "used by confidence source 'ups'", flags=("--ups_head",), metavar="PATH")
    lora_path: Optional[str] = arg(None, "PEFT LoRA adapter folder applied to the backbone")
    mask_id: Optional[int] = arg(None, "None = the loaded backbone's mask id")
    device: str = arg("auto", "torch device: auto = cuda when this torch sees a GPU, else cpu; or cpu, cuda, cuda:1")
    dtype: str = arg("auto", "auto: bfloat16 on CUDA, the checkpoint's dtype otherwise", choices=DTYPES)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {list(DTYPES)}")

    def check(self) -> "ModelSpec":
        """Refuse, before loading anything, paths that do not exist and a device this torch cannot use."""
        for flag, value in (("--ups_head", self.ups_head_path), ("--lora_path", self.lora_path)):
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"{flag} {value}: this local path does not exist (looked for "
                                        f"{Path(value).expanduser().resolve()}); pass the path train_remedi.py wrote, "
                                        f"or leave {flag} out")
        for flag, value in (("--model", self.model_name), ("--tokenizer", self.tokenizer)):
            if value is not None and (flag == "--tokenizer" or embedded_folder(value) is None):
                try:
                    resolve_source(value, what=flag.lstrip("-"))  # the project's one local-path-vs-hub-name rule
                except FileNotFoundError as err:
                    raise FileNotFoundError(f"{flag}: {err}") from None
        if self.device == "auto":
            return self
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}, but this torch has no CUDA device; pass --device cpu")
        return self

    def load(self) -> EvalModel:
        """Backbone, then the LoRA adapter, then the UPS head (checked to fit the backbone)."""
        return load_eval_model(self.model_name, tokenizer=self.tokenizer, device=resolve_device(self.device),
                               dtype=self.dtype,
                               lora_path=self.lora_path, ups_head_path=self.ups_head_path, mask_id=self.mask_id,
                               smdm_size=self.smdm_size)


def add_model_args(parser: argparse.ArgumentParser, defaults: Optional[dict] = None,
                   group: str = "model") -> argparse.ArgumentParser:
    """The model flags of every sampling CLI, from ModelSpec (defaults: per-CLI overrides)."""
    return add_config_args(parser, ModelSpec, group=group, defaults=defaults)


def model_spec_from_args(namespace: argparse.Namespace) -> ModelSpec:
    """The checked ModelSpec of parsed flags (FileNotFoundError / ValueError name the flag and the fix)."""
    return config_from_args(ModelSpec, namespace).check()
