"""SEDD (score-entropy discrete diffusion, Lou et al. 2024) in pure PyTorch: the DDiT score network whose weights
load from the upstream checkpoints (louaaron/sedd-small, -medium, or a local run folder), and its loaders.

    from remedi_patches.sedd import load_sedd, sedd_small, SEDD
    model = load_sedd("/models/sedd-small")              # hub-layout folder, run folder or hub name
    log_score = model(indices, sigma)                    # (B, L) long, (B,) -> (B, L, V)

`remedi_patches.backbones.load_backbone(folder)` recognises the same folders as kind "sedd". Noise schedules,
graphs, the score-entropy loss and the samplers live beside this package's model (noise, graphs, losses,
sampling).
"""

from .loading import build_sedd_meta, is_sedd_folder, is_sedd_run, is_sedd_source, load_sedd, read_config, save_sedd
from .model import (DDiTBlock, DDiTFinalLayer, SEDD, SEDDConfig, sedd_medium, sedd_small, sedd_state_dict_keys,
                    sigma_sinusoid)

__all__ = [
    "DDiTBlock", "DDiTFinalLayer", "SEDD", "SEDDConfig", "build_sedd_meta", "is_sedd_folder", "is_sedd_run",
    "is_sedd_source", "load_sedd", "read_config", "save_sedd", "sedd_medium", "sedd_small", "sedd_state_dict_keys",
    "sigma_sinusoid",
]
