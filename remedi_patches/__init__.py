"""RemeDi additions that the LLaDA sampler, the SMDM trainers and the evaluation adapters call into.

Modules (one concept each; importing this package imports nothing heavy, yet registers model_type "llada" with
transformers' Auto classes as soon as those are imported: see auto_register.py):

    llada/              native LLaDA backbone (transformers, model_type "llada", Auto-registered)
    backbones.py        the backbone registry (one entry per kind) and load_backbone() / load_eval_model()
    sources.py          one rule for "local path or hub name?"
    auto_register.py    the lazy Auto-class registration of model_type "llada"
    ups_head.py         UPSHead: per-token Unmasking Policy Stream logit on the last hidden state
    modeling_wrappers.py  TPS logits + UPS logits from one forward; save/load of heads; LoRA loading
    confidence.py       confidence sources for dynamic remasking (ups, tps_prob, random, margin, entropy)
    remasking.py        commit schedule k_i and keep-top-k_i / re-mask-the-rest selection
    noise.py            Remask SFT noise: rho_mask(t) = t, rho_incorrect(t) = 4 r t (1 - t)
    losses.py           TPS cross-entropy and UPS BCE with their labels
    data.py             datasets by hub name or local file, field layouts, prompt/answer tokenisation
    metrics.py          incorrect-token detection AUC / ROC / confusion matrix
    graders.py          GSM8K and MATH answer extraction and grading
    embedded/           the tiny task, tokenizer and backbone that make everything run on a CPU
"""

from remedi_patches.auto_register import install as _install_auto_register

_install_auto_register()  # AutoModel.from_pretrained(<LLaDA folder>) works after `import remedi_patches` (lazily)
