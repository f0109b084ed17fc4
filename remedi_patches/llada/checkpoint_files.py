"""What a saved transformers folder holds, read from the safetensors headers only (no tensor data is loaded).

Used to verify a checkpoint against its config before loading (`modeling_llada.verify_checkpoint`) and to tell a
dual-stream RemeDi checkpoint (tensors `model.blocks_upm.{j}.*`) from a plain LLaDA one.
"""

import json
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

UPS_BLOCK = re.compile(r"model\.blocks_upm\.(\d+)\.")


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a saved model (one file, or the shards named by the index); [] if none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"{index} is not a valid safetensors index ({err!r}): re-download it or re-save the model."
            ) from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {index.name} but missing: re-download the checkpoint.")
        return files
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def checkpoint_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, file name) over every safetensors file of `folder`; {} when it holds none.

    A truncated or corrupt file is one ValueError naming it."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in safetensors_files(Path(folder)):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    found[name] = (tuple(f.get_slice(name).get_shape()), path.name)
        except SafetensorError as err:
            raise ValueError(
                f"{path} is truncated or corrupt ({err}). Re-download it, or re-save the model with "
                "save_pretrained."
            ) from err
    return found


def ups_block_count(names) -> int:
    """Number of UPS blocks (`model.blocks_upm.{j}.*`, j = 0..K-1) among the tensor names; 0 for a plain LLaDA."""
    indices = {int(m.group(1)) for name in names if (m := UPS_BLOCK.match(name))}
    return max(indices) + 1 if indices else 0
