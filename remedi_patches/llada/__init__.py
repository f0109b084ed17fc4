"""Native LLaDA backbone and the dual-stream RemeDi for transformers 5 (no trust_remote_code).

Importing this package registers model_type "llada" (LLaDAModelLM) and "RemeDi" (RemeDiUPMModelLM) with
AutoConfig, AutoModel and AutoModelForCausalLM, so a folder holding a GSAI-ML/LLaDA-8B checkpoint loads with
`AutoModel.from_pretrained(path)`. The released RemeDi checkpoints say model_type "llada" too: `load_llada(path)`
(and `remedi_patches.backbones.load_backbone`) picks the dual-stream class for them (see `loading`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_llada import LLaDAConfig, llada_8b_config
from .configuration_remedi import RemeDiConfig, default_ups_positions, remedi_9b_config
from .loading import build_on_meta, is_dual_stream, load_llada, model_class
from .modeling_llada import LLaDABlock, LLaDAModelLM, verify_checkpoint
from .modeling_remedi import RemeDiModelOutput, RemeDiUPMModelLM

for _config, _model in ((LLaDAConfig, LLaDAModelLM), (RemeDiConfig, RemeDiUPMModelLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)

__all__ = [
    "LLaDABlock", "LLaDAConfig", "LLaDAModelLM", "RemeDiConfig", "RemeDiModelOutput", "RemeDiUPMModelLM",
    "build_on_meta", "default_ups_positions", "is_dual_stream", "llada_8b_config", "load_llada", "model_class",
    "remedi_9b_config", "verify_checkpoint",
]
