# GSM8K (4-shot chat prompt, opencompass's gsm8k_gen) for LLaDA-8B-Instruct: upstream sampling vs UPS remasking.
#   COMPASS_DATA_CACHE=/data/opencompass opencompass opencompass_patch/configs/eval_llada_gsm8k.py
# ($COMPASS_DATA_CACHE/data/gsm8k/{train,test}.jsonl; `python -m opencompass_patch.prepare_data` writes it)
from mmengine.config import read_base

with read_base():
    from opencompass.configs.datasets.gsm8k.gsm8k_gen import gsm8k_datasets
    from .models.llada_8b_instruct import models as llada_instruct
    from .models.llada_8b_instruct_ups import models as llada_instruct_ups

datasets = gsm8k_datasets
models = llada_instruct + llada_instruct_ups
