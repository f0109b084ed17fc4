# LLaDA-8B-Base through opencompass_patch (upstream sampling: confidence_source=None).
# Change `confidence_source` to 'tps_prob' / 'random' for RemeDi dynamic remasking without a head,
# or use llada_8b_base_ups.py for the UPS head.
from opencompass_patch.models import LLaDABaseModel

models = [
    dict(
        type=LLaDABaseModel,
        abbr='llada-8b-base',
        path='GSAI-ML/LLaDA-8B-Base',  # or a local folder holding the checkpoint
        max_out_len=1024,
        batch_size=8,  # prompts per generate() call
        batch_size_=8,  # prompts per sampler call (left-padded)
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
        diff_confidence_eos_eot_inf=False,
        diff_logits_eos_inf=False,
        confidence_source=None,
        stop_words=['Question:'],
    )
]
