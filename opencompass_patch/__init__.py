"""Evaluation adapters that thread RemeDi's confidence_source into generate() from benchmark harnesses.

    opencompass_patch.models      OpenCompass LLaDAModel (chat) / LLaDABaseModel (base), registered with MODELS
    opencompass_patch.configs     model configs (LLaDA-8B Base / Instruct, each with a UPS variant, embedded tiny)
                                  and runnable eval configs (GSM8K, MATH-500, HumanEval, embedded GSM8K)
    opencompass_patch.harness     harness-neutral loading and batched sampling (also used by eval_llada.py)
    opencompass_patch.likelihood  LLaDA's Monte Carlo log-likelihood estimator (used by eval_llada.py)
    opencompass_patch.prepare_data  local GSM8K / MATH-500 / HumanEval files -> $COMPASS_DATA_CACHE layout

Importing this package imports neither OpenCompass nor torch; `opencompass_patch.models` needs OpenCompass.
"""
