# GSM8K-layout evaluation of the embedded tiny model on CPU, zero-shot in the embedded task's prompt format
# ("Question: ...\nAnswer:"), first 50 test problems. Data: $COMPASS_DATA_CACHE/data/gsm8k/{train,test}.jsonl,
# real GSM8K or the embedded task's own split (python -m remedi_patches.embedded.task --out_dir DIR writes the
# same layout; python -m opencompass_patch.prepare_data --gsm8k DIR copies it into place).
#   COMPASS_DATA_CACHE=/data/opencompass opencompass opencompass_patch/configs/eval_embedded_gsm8k.py
from mmengine.config import read_base
from opencompass.datasets import GSM8KDataset, Gsm8kEvaluator, gsm8k_dataset_postprocess, gsm8k_postprocess
from opencompass.openicl.icl_inferencer import GenInferencer
from opencompass.openicl.icl_prompt_template import PromptTemplate
from opencompass.openicl.icl_retriever import ZeroRetriever

with read_base():
    from .models.remedi_embedded import models as embedded_models

datasets = [
    dict(
        abbr='gsm8k',
        type=GSM8KDataset,
        path='opencompass/gsm8k',
        reader_cfg=dict(input_columns=['question'], output_column='answer', test_range='[0:50]'),
        infer_cfg=dict(
            prompt_template=dict(type=PromptTemplate,
                                 template=dict(round=[dict(role='HUMAN', prompt='Question: {question}\nAnswer:')])),
            retriever=dict(type=ZeroRetriever),
            inferencer=dict(type=GenInferencer),
        ),
        eval_cfg=dict(evaluator=dict(type=Gsm8kEvaluator), pred_postprocessor=dict(type=gsm8k_postprocess),
                      dataset_postprocessor=dict(type=gsm8k_dataset_postprocess)),
    )
]
models = embedded_models
