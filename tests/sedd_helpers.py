"""A tiny random SEDD saved in the hub layout, with the embedded tokenizer, for tests of the SEDD tools.

    folder = random_sedd(tmp_path / "tiny", length=48)    # load_backbone(folder).kind == "sedd"
"""
from __future__ import annotations

from pathlib import Path

import torch

from remedi_patches.backbones import load_backbone
from remedi_patches.sedd import SEDD, SEDDConfig, save_sedd


def random_sedd(folder: Path, length: int) -> Path:
    """A 2-block SEDD (hidden 32, absorbing graph, window `length`) with every parameter random (adaLN-Zero would
    make the blocks identities), seeded, saved with the embedded sentencepiece tokenizer (512 tokens)."""
    tokenizer = load_backbone(None).tokenizer
    config = SEDDConfig(hidden_size=32, n_heads=4, n_blocks=2, cond_dim=16, length=length, tokens=len(tokenizer),
                        graph="absorb", name="tiny")
    torch.manual_seed(0)
    model = SEDD(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
    return save_sedd(model.eval(), folder, tokenizer)
