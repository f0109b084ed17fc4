"""SMDM model code: `Config.from_name("Diff_LLaMA_<N>M")`, `TransEncoder`, the dual-stream `RemeDiTransEncoder`
(`build_model(config)` picks one from `config.ups_positions`), SMDM folder export/import."""
from lit_gpt.config import Config
from lit_gpt.dual_stream import RemeDiTransEncoder, remedi_from_backbone
from lit_gpt.model import TransEncoder, build_model, load_smdm_config, load_smdm_folder, load_weights, save_smdm_folder

__all__ = ["Config", "RemeDiTransEncoder", "TransEncoder", "build_model", "load_smdm_config", "load_smdm_folder",
           "load_weights", "save_smdm_folder", "remedi_from_backbone"]
