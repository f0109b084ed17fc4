"""SMDM model code: `Config.from_name("Diff_LLaMA_<N>M")`, `TransEncoder`, SMDM folder export/import."""
from lit_gpt.config import Config
from lit_gpt.model import TransEncoder, load_smdm_config, load_smdm_folder, load_weights, save_smdm_folder

__all__ = ["Config", "TransEncoder", "load_smdm_config", "load_smdm_folder", "load_weights", "save_smdm_folder"]
