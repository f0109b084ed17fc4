# LLaDA-8B-Instruct with RemeDi dynamic remasking by a trained UPS head (train_remedi.py --save_ups_head).
from mmengine.config import read_base

with read_base():
    from .llada_8b_instruct import models as instruct_models

models = [
    dict(
        instruct_models[0],
        abbr='llada-8b-instruct-ups',
        confidence_source='ups',
        ups_head_path='checkpoints/ups_head.safetensors',  # your UPS head file
        lora_path=None,  # a LoRA folder from train_remedi.py --save_lora_dir, if the TPS was tuned too
    )
]
