"""Native LLaDA backbone for transformers 5 (no trust_remote_code).

Importing this package registers model_type "llada" with AutoConfig, AutoModel and AutoModelForCausalLM, so a
folder holding a GSAI-ML/LLaDA-8B checkpoint (its config.json names LLaDAModelLM) loads with
`AutoModel.from_pretrained(path)`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_llada import LLaDAConfig, llada_8b_config
from .modeling_llada import LLaDABlock, LLaDAModelLM, load_llada, verify_checkpoint

AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

__all__ = ["LLaDABlock", "LLaDAConfig", "LLaDAModelLM", "llada_8b_config", "load_llada", "verify_checkpoint"]
