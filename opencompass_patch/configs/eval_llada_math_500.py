# MATH-500 (0-shot, \boxed{} answers graded by math-verify) for LLaDA-8B-Instruct: upstream sampling vs UPS.
#   COMPASS_DATA_CACHE=/data/opencompass opencompass opencompass_patch/configs/eval_llada_math_500.py
# ($COMPASS_DATA_CACHE/data/math/test_prm800k_500.jsonl; `python -m opencompass_patch.prepare_data` writes it)
from mmengine.config import read_base

with read_base():
    from opencompass.configs.datasets.math.math_500_gen import math_datasets
    from .models.llada_8b_instruct import models as llada_instruct
    from .models.llada_8b_instruct_ups import models as llada_instruct_ups

datasets = math_datasets
models = llada_instruct + llada_instruct_ups
