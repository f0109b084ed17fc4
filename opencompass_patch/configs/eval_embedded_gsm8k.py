# The embedded tiny model on CPU, on the embedded task's own held-out problems in GSM8K format, zero-shot in its
# prompt format ("Question: ...\nAnswer:"), sampler lengths 32 / 32 / 32: the settings and problems of
# `python eval_gsm_math.py --confidence_sources upstream --max_samples N`, which scores the same.
#   python -m opencompass_patch.prepare_data --embedded 50     # writes out/compass_data/data/embedded_gsm8k
#   opencompass opencompass_patch/configs/eval_embedded_gsm8k.py    # writes out/opencompass/<time>/
# Data: $COMPASS_DATA_CACHE/data/embedded_gsm8k/{train,test}.jsonl (COMPASS_DATA_CACHE unset: out/compass_data, from
# the working directory), every test problem there. Results: -w DIR, else out/opencompass.
import os

from mmengine.config import read_base
from opencompass.datasets import GSM8KDataset, Gsm8kEvaluator, gsm8k_dataset_postprocess, gsm8k_postprocess
from opencompass.openicl.icl_inferencer import GenInferencer
from opencompass.openicl.icl_prompt_template import PromptTemplate
from opencompass.openicl.icl_retriever import ZeroRetriever

with read_base():
    from .models.remedi_embedded import models as embedded_models

data_path = os.path.abspath(os.path.join(os.environ.get('COMPASS_DATA_CACHE') or os.path.join('out', 'compass_data'),
                                         'data', 'embedded_gsm8k'))
if not os.path.isfile(os.path.join(data_path, 'test.jsonl')):
    raise FileNotFoundError(f'{data_path}/test.jsonl does not exist; write it with '
                            '`python -m opencompass_patch.prepare_data --embedded 50` (add --out DIR and set '
                            'COMPASS_DATA_CACHE=DIR to keep it elsewhere)')

datasets = [
    dict(
        abbr='embedded_gsm8k',
        type=GSM8KDataset,
        path=data_path,  # absolute: OpenCompass reads it as it is, never downloads
        reader_cfg=dict(input_columns=['question'], output_column='answer'),
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
work_dir = os.path.join('out', 'opencompass')
del data_path, os  # a config keeps plain values only
