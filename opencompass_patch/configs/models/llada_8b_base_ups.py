# LLaDA-8B-Base with RemeDi dynamic remasking by a trained UPS head (train_remedi.py --save_ups_head).
from mmengine.config import read_base

with read_base():
    from .llada_8b_base import models as base_models

models = [
    dict(
        base_models[0],
        abbr='llada-8b-base-ups',
        confidence_source='ups',
        ups_head_path='checkpoints/ups_head.safetensors',  # your UPS head file
        lora_path=None,  # a LoRA folder from train_remedi.py --save_lora_dir, if the TPS was tuned too
    )
]
