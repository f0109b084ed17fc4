"""OpenCompass adapters that thread RemeDi's confidence_source into the project's sampler.

    opencompass_patch.models        OpenCompass LLaDAModel (chat) / LLaDABaseModel (base), registered with MODELS
    opencompass_patch.configs       model configs (LLaDA-8B Base / Instruct, each with a UPS variant, embedded tiny)
                                    and runnable eval configs (GSM8K, MATH-500, HumanEval, embedded GSM8K)
    opencompass_patch.prepare_data  local GSM8K / MATH-500 / HumanEval files -> $COMPASS_DATA_CACHE layout

What OpenCompass shares with lm-eval's eval_llada.py (loading, left padding, batched answers, decoding) lives in
remedi_patches.sampling and remedi_patches.backbones; LLaDA's Monte Carlo log-likelihood in
remedi_patches.likelihood. Importing this package imports neither OpenCompass nor torch.
"""
