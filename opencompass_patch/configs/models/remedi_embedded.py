# The project's embedded tiny backbone (remedi_patches/embedded/assets), on CPU, upstream sampling.
# Set confidence_source='tps_prob' / 'random' (or 'ups' with ups_head_path=...) to compare remasking rules.
from opencompass_patch.models import LLaDABaseModel

models = [
    dict(
        type=LLaDABaseModel,
        abbr='remedi-embedded',
        path=None,  # None = the embedded tiny model
        max_out_len=32,
        batch_size=16,
        batch_size_=16,
        run_cfg=dict(num_gpus=0),
        device='cpu',
        dtype=None,
        max_seq_len=128,  # the embedded backbone's block size (prompts of the embedded task take <= 40 tokens)
        gen_steps=32,
        gen_length=32,
        gen_blocksize=32,
        temperature=0.0,
        cfg=0.0,
        remasking='low_confidence',
        confidence_source=None,
        stop_words=['Question:'],
    )
]
