# LLaDA-8B-Instruct through opencompass_patch (chat template; upstream sampling: confidence_source=None).
from opencompass_patch.models import LLaDAModel

models = [
    dict(
        type=LLaDAModel,
        abbr='llada-8b-instruct',
        path='GSAI-ML/LLaDA-8B-Instruct',  # or a local folder holding the checkpoint
        max_out_len=1024,
        batch_size=8,
        batch_size_=8,
        run_cfg=dict(num_gpus=1),
        dtype='bfloat16',
        max_seq_len=4096,
        gen_steps=512,
        gen_length=512,
        gen_blocksize=32,
        temperature=0.0,
        cfg=0.0,
        remasking='low_confidence',
        mask_id=126336,
        padding_id=126081,
        diff_confidence_eos_eot_inf=True,
        diff_logits_eos_inf=False,
        confidence_source=None,
    )
]
