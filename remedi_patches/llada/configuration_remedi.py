"""Configuration of the dual-stream RemeDi (DESIGN.md 10): LLaDA's config plus where the UPS blocks sit.

The released checkpoints (maple-research-lab/RemeDi-Instruct, RemeDi-RL) carry LLaDA's config.json, most likely
with model_type "llada" and architectures ["LLaDAUPMModelLM"]; the official code names its class RemeDiConfig
with model_type "RemeDi". Neither records where the UPS blocks sit (the official code hard-codes main layers
[0, 10, 20, 30]). `RemeDiConfig.from_pretrained` reads any of these folders: the model_type is taken as "RemeDi",
and a missing `ups_positions` is derived from the number of UPS blocks in the folder's weights by
`default_ups_positions` (four blocks when the weights cannot be listed, e.g. a config-only folder or a hub name).
"""

from pathlib import Path

from huggingface_hub.dataclasses import strict

from .checkpoint_files import checkpoint_shapes, ups_block_count
from .configuration_llada import LLaDAConfig

# architecture names of the dual-stream model: the authors' copy, the maple release, and this implementation
UPM_ARCHITECTURES = ("LLaDAUPMModelLM", "RemeDiUPMModelLM")
DEFAULT_UPS_BLOCKS = 4  # the released checkpoints' count


def default_ups_positions(n_layers: int, n_blocks: int = DEFAULT_UPS_BLOCKS) -> list[int]:
    """Main layers after which the UPS blocks run when a config does not say: 0, s, 2s, ..., (K-1)s with
    s = (n_layers - 2) // (K - 1); a single block sits after layer n_layers - 2.

    For 32 layers and 4 blocks this is the official [0, 10, 20, 30]: the first block reads the first layer, the last
    one the second-to-last layer, so its feedback still reaches one main layer.
    """
    last = n_layers - 2
    if n_blocks == 1 and last >= 0:
        return [last]
    stride = last // (n_blocks - 1) if n_blocks > 1 and last > 0 else 0
    if stride < 1:
        raise ValueError(
            f"cannot place {n_blocks} UPS block(s) after {n_layers} main layers by the default rule (0, s, 2s, ... "
            "with s = (n_layers - 2) // (blocks - 1)); set ups_positions in config.json, e.g. [0] for one block"
        )
    return [j * stride for j in range(n_blocks)]


def check_ups_positions(positions: list[int], n_layers: int) -> None:
    """One ValueError unless `positions` are strictly increasing main-layer indices in [0, n_layers - 1]."""
    ok = (
        len(positions) > 0
        and all(isinstance(p, int) and 0 <= p < n_layers for p in positions)
        and all(a < b for a, b in zip(positions, positions[1:]))
    )
    if not ok:
        raise ValueError(
            f"ups_positions={positions!r} is not valid for {n_layers} main layers: give strictly increasing layer "
            f"indices in [0, {n_layers - 1}], one UPS block after each (the released 32-layer model: [0, 10, 20, 30])"
        )


@strict
class RemeDiConfig(LLaDAConfig):
    model_type = "RemeDi"

    # main layers after which the UPS blocks run (block j after layer ups_positions[j]); None: the default rule
    # with 4 blocks (default_ups_positions), written back when the model is built so saved configs are explicit
    ups_positions: list[int] | None = None

    def resolved_ups_positions(self) -> list[int]:
        """The checked UPS positions (`ups_positions`, else the default rule)."""
        positions = list(self.ups_positions) if self.ups_positions is not None else default_ups_positions(self.n_layers)
        check_ups_positions(positions, self.n_layers)
        return positions

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """The config.json of a dual-stream folder (model_type "llada" or "RemeDi"), read as a RemeDiConfig; without
        `ups_positions`, they are derived from the number of UPS blocks in the folder's safetensors weights."""
        folder = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        config_dict = {**config_dict, "model_type": cls.model_type}
        if config_dict.get("ups_positions") is None and folder.is_dir():
            n_blocks = ups_block_count(checkpoint_shapes(folder))
            if n_blocks:
                n_layers = config_dict.get("n_layers", cls.n_layers)
                config_dict["ups_positions"] = default_ups_positions(n_layers, n_blocks)
        return config_dict, kwargs


def remedi_9b_config() -> RemeDiConfig:
    """The released RemeDi-9B: LLaDA-8B's configuration with UPS blocks after main layers [0, 10, 20, 30]."""
    return RemeDiConfig(architectures=["RemeDiUPMModelLM"], ups_positions=[0, 10, 20, 30])
