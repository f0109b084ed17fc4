"""Which class reads a LLaDA-family checkpoint, strict loading, and building one on the meta device.

A checkpoint is a dual-stream RemeDi (`RemeDiUPMModelLM`) when its config.json says model_type "RemeDi", or
model_type "llada" with a UPM architecture name (the released checkpoints: "LLaDAUPMModelLM"), or when its local
safetensors hold `model.blocks_upm.*` tensors; anything else is read by the transformers Auto classes (a plain
LLaDA: `LLaDAModelLM`).
"""

from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from .checkpoint_files import checkpoint_shapes, ups_block_count
from .configuration_remedi import UPM_ARCHITECTURES, RemeDiConfig
from .modeling_remedi import RemeDiUPMModelLM

# from_pretrained arguments that say where / how to fetch the config (passed on when only the config is read)
HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def is_dual_stream(config_dict: dict, folder: Path | None) -> bool:
    """Does this config.json (and, for a local folder, its weights) describe a dual-stream RemeDi?"""
    model_type = config_dict.get("model_type")
    if model_type == RemeDiConfig.model_type:
        return True
    if model_type == "llada" and set(config_dict.get("architectures") or ()) & set(UPM_ARCHITECTURES):
        return True
    return folder is not None and folder.is_dir() and ups_block_count(checkpoint_shapes(folder)) > 0


def model_class(source: str | Path, **kwargs) -> type:
    """RemeDiUPMModelLM for a dual-stream checkpoint, else AutoModel; `kwargs` as for from_pretrained."""
    hub = {key: kwargs[key] for key in HUB_KEYS if key in kwargs}
    config_dict, _ = PretrainedConfig.get_config_dict(str(source), **hub)
    folder = Path(str(source)) / (kwargs.get("subfolder") or "")
    return RemeDiUPMModelLM if is_dual_stream(config_dict, folder) else AutoModel


def load_llada(path: str | Path, **kwargs) -> nn.Module:
    """Load a LLaDA or dual-stream RemeDi checkpoint (local folder or hub name) strictly; `kwargs` go to
    `from_pretrained` (dtype, ...).

    Local folders are verified before loading (see `modeling_llada.verify_checkpoint`); for downloaded or
    non-safetensors checkpoints the loading report is checked afterwards. Every problem is one ValueError naming it.
    `ignore_mismatched_sizes=True` keeps transformers' meaning: tensors whose shapes differ are re-initialised.
    """
    try:
        model, info = model_class(path, **kwargs).from_pretrained(path, output_loading_info=True, **kwargs)
    except SafetensorError as err:
        raise ValueError(
            f"A weights file of {path} is truncated or corrupt ({err}): delete it and download it again."
        ) from err
    except RuntimeError as err:
        if "mismatch" not in str(err):
            raise
        raise ValueError(
            f"The weights of {path} do not have the shapes its config.json describes (see the load report "
            "above for the tensor names): use the config.json saved with these weights."
        ) from err
    strict = ["missing_keys", "unexpected_keys"]
    if not kwargs.get("ignore_mismatched_sizes"):
        strict.append("mismatched_keys")
    problems = {key: sorted(map(str, info[key])) for key in strict}
    problems = {key: names for key, names in problems.items() if names}
    if problems:
        raise ValueError(
            f"Loading {path} is not exact: {problems}. Re-download the checkpoint, or use the config.json saved "
            "with it."
        )
    return model


def build_on_meta(source: str | Path, dtype: torch.dtype | None = None, **kwargs) -> nn.Module:
    """The model a checkpoint's config describes, on the meta device: its config.json alone is read (no weights,
    no memory); for counting parameters, planning sharding, or checking a config before a download."""
    hub = {key: kwargs[key] for key in HUB_KEYS if key in kwargs}
    config_class = RemeDiConfig if model_class(source, **hub) is RemeDiUPMModelLM else AutoConfig
    config = config_class.from_pretrained(str(source), **hub)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return model.to(dtype) if dtype is not None else model
