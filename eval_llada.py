"""lm-evaluation-harness model for LLaDA-style masked-diffusion LMs, registered as `llada_dist` (upstream LLaDA's name).

    python eval_llada.py --model llada_dist --tasks gsm8k --num_fewshot 4 \\
        --model_args model_path=GSAI-ML/LLaDA-8B-Base,gen_length=256,steps=256,block_length=32
    python eval_llada.py --model llada_dist --tasks gsm8k_local --include_path eval_tasks \\
        --metadata '{"data_dir": "../shared/data/gsm8k"}' --limit 50 \\
        --model_args model_path=GSAI-ML/LLaDA-8B-Base,confidence_source=ups,ups_head_path=checkpoints/ups.safetensors
    python eval_llada.py --model llada_dist --tasks hellaswag --batch_size 8 \\
        --model_args model_path=GSAI-ML/LLaDA-8B-Base,mc_num=128     # likelihood tasks
    python eval_llada.py --model llada_dist --tasks gsm8k --num_fewshot 5 \\
        --model_args model_path=GSAI-ML/LLaDA-8B-Base,gen_length=256,steps=256,block_length=32,threshold=0.9,cache=dual
                                     # Fast-dLLM's parallel decoding and dual cache (or use_cache=true,dual_cache=true)

generate_until samples through remedi_patches.sampling.sample (batch_size prompts per call, left-padded), so
confidence_source / ups_head_path / lora_path / remask / threshold / factor / cache / cache_interval act as in
`python generate.py` (`ups_head` is accepted as the older name of ups_head_path; Fast-dLLM's use_cache / dual_cache
as aliases of cache). After each generate_until call one INFO line gives the sampler's cost so far ('NFE 6, 812.4
tokens/s': model forwards per sampler call, answer positions filled per second), kept in `sampler_cost` (a
remedi_patches.remasking.Trajectory). loglikelihood is LLaDA's Monte Carlo estimator (remedi_patches.likelihood):
mc_num masked copies of the answer in minibatches of
batch_size, CE divided by the mask ratio, averaged. Seeded with --seed's torch seed as lm-eval sets it.
`python eval_llada.py` runs lm-eval's own command line with this model registered. Launched as several
processes (`accelerate launch eval_llada.py ...` or `torchrun --nproc_per_node N eval_llada.py ...`; on CPU
with ACCELERATE_USE_CPU=1) each rank takes its share of the requests on its own device and lm-eval gathers
the results.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from remedi_patches.backbones import load_eval_model, max_length_of
from remedi_patches.likelihood import mc_loglikelihood
from remedi_patches.model_args import resolve_device
from remedi_patches.modeling_wrappers import backbone_forward
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import (PromptWindow, SamplerSettings, check_decoding, decode_answer,
                                     generate_answer_ids, harness_settings, harness_window, optional_number,
                                     optional_value, sample)

logger = logging.getLogger("lm_eval.llada_dist")  # under lm-eval's logger: shown by its command line
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def distributed_accelerator():
    """An accelerate.Accelerator when launched as several processes (accelerate launch, torchrun), else None."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    from accelerate import Accelerator

    accelerator = Accelerator()
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"launched as {world_size} processes but accelerate sees {accelerator.num_processes}; "
                           "on CPU set ACCELERATE_USE_CPU=1 (e.g. ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 "
                           "eval_llada.py ...), so every process does not evaluate everything")
    return accelerator


def flag_arg(key: str, value) -> Optional[bool]:
    """A bool-ish --model_args value (True / False, 'true' / 'false', 1 / 0, yes / no, on / off) as a bool; None
    for None, '' and 'none' (not given); a one-line ValueError naming the key for anything else."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "none"):
        return None
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    raise ValueError(f"{key} must be true or false, got {value!r}")


def cache_arg(cache, use_cache=None, dual_cache=None) -> Optional[str]:
    """The SamplerSettings cache of llada_dist's keys: `cache` ('prefix' | 'dual' | none), or Fast-dLLM's harness
    flags use_cache=true (= 'prefix') and use_cache=true,dual_cache=true (= 'dual'); use_cache=false = no cache.
    A cache that disagrees with use_cache, and dual_cache without use_cache, are refused in one line."""
    cache = optional_value(cache)
    use, dual = flag_arg("use_cache", use_cache), flag_arg("dual_cache", dual_cache)
    if dual and not use:
        raise ValueError("dual_cache=true needs use_cache=true (Fast-dLLM's flags: use_cache=true,dual_cache=true "
                         "means cache=dual); add use_cache=true, or give cache=dual instead")
    if use is None:
        return cache
    alias = ("dual" if dual else "prefix") if use else None
    if cache != alias and cache is not None:
        raise ValueError(f"cache={cache} conflicts with use_cache={str(use).lower()}"
                         f"{',dual_cache=true' if dual else ''} (= cache={alias or 'none'}); give cache alone, or "
                         "Fast-dLLM's use_cache / dual_cache alone")
    return alias


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing spaces of the context to the front of the continuation (word-initial tokens)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


@register_model("llada_dist")
class LLaDAEvalHarness(LM):
    def __init__(self, model_path: Optional[str] = None, mask_id: Optional[int] = None, max_length: int = 4096,
                 batch_size: int = 32, mc_num: int = 128, is_check_greedy: bool = False, cfg: float = 0.0,
                 steps: Optional[int] = None, gen_length: Optional[int] = None, block_length: Optional[int] = None,
                 remasking: str = "low_confidence", temperature: float = 0.0, logits_eos_inf: bool = False,
                 confidence_eos_eot_inf: bool = False, confidence_source: Optional[str] = None,
                 remask: Optional[bool] = None, ups_head_path: Optional[str] = None, lora_path: Optional[str] = None,
                 padding_id: Optional[int] = None,
                 tokenizer: Optional[str] = None, smdm_size: Optional[str] = None, device: Optional[str] = None,
                 dtype: Optional[str] = "auto", max_batch_size: Optional[int] = None,
                 ups_head: Optional[str] = None, ups_temperature: float = 0.0, decoding: Optional[str] = None,
                 threshold: Optional[float] = None, factor: Optional[float] = None, cache: Optional[str] = None,
                 cache_interval: Optional[int] = None, use_cache: Optional[bool] = None,
                 dual_cache: Optional[bool] = None):
        """
        Args (upstream llada_dist's, then RemeDi's):
            model_path: model folder / hub name / SMDM export; None or 'embedded' = the embedded tiny model.
            mask_id: None = the backbone's. max_length: prompt + answer token budget.
            batch_size: rows per forward: Monte Carlo minibatch (mc_num must be a multiple) and prompts per
                sampler call. mc_num: masked copies per log-likelihood.
            is_check_greedy: also report whether the continuation is what the sampler decodes greedily,
                one token per step (slow; no metric of the LLaDA paper needs it, hence off).
            cfg: classifier-free guidance scale for both generation and likelihood.
            steps, gen_length, block_length, remasking, temperature, logits_eos_inf,
                confidence_eos_eot_inf: the sampler's arguments (generate.py); lengths left None (the default)
                come from the model's window as in generate.py (LLaDA-8B: 128 / 128 / 32).
            confidence_source, remask, ups_head_path, lora_path: RemeDi dynamic remasking (generate.py); remask
                None = dynamic sources re-mask, upstream never does. ups_head: older name of ups_head_path.
            ups_temperature, decoding: generate.py's --ups_temperature ('ups' ranking by Plackett-Luce draws when
                > 0) and --decoding (None = block diffusion for a dual-stream RemeDi, LLaDA's sampler otherwise).
            threshold, factor: parallel decoding (generate.py's --threshold / --factor, at most one; Fast-dLLM uses
                threshold=0.9 or factor=1): per step commit every masked position whose confidence passes, at least
                one. None (or 'none') = the fixed schedule.
            cache, cache_interval: LLaDA-style decoding's approximate KV cache (generate.py's --cache /
                --cache_interval): 'prefix' | 'dual' | None = exact; refreshed once per block, or every
                cache_interval steps of it. Not with block decoding (which caches exactly).
            use_cache, dual_cache: Fast-dLLM's harness flags, accepted as aliases of cache: use_cache=true =
                cache=prefix, use_cache=true,dual_cache=true = cache=dual; refused with a cache that says otherwise,
                and dual_cache=true without use_cache=true.
            padding_id: left-padding id (None = the tokenizer's pad, else EOS). tokenizer: when the model has none.
            smdm_size: architecture of an SMDM iter-*-ckpt.pth checkpoint (e.g. Diff_LLaMA_170M).
            device: None / 'auto' = cuda if available else cpu.
            dtype: 'auto' = bfloat16 on CUDA, the checkpoint's elsewhere.
            max_batch_size: accepted from lm-eval's command line; unused (batch_size is fixed).
        """
        super().__init__()
        if ups_head is not None:
            if ups_head_path is not None:
                raise ValueError("both ups_head and ups_head_path are set; keep ups_head_path (the head file) only")
            ups_head_path = ups_head
        if not isinstance(batch_size, int) and not str(batch_size).isdigit():
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r} (no 'auto' for llada_dist)")
        self.batch_size = int(batch_size)
        if mc_num < 1 or self.batch_size < 1 or mc_num % self.batch_size:
            raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of batch_size ({self.batch_size}); "
                             "e.g. mc_num=128 with --batch_size 32")
        self.mc_num, self.max_length, self.is_check_greedy = mc_num, max_length, is_check_greedy
        sampler_fields = dict(steps=steps, gen_length=gen_length, block_length=block_length,
                              temperature=temperature, cfg_scale=cfg, remasking=remasking,
                              logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
                              confidence_source=optional_value(confidence_source), remask=remask,
                              ups_temperature=float(ups_temperature), decoding=optional_value(decoding),
                              threshold=optional_number("threshold", threshold),
                              factor=optional_number("factor", factor),
                              cache=cache_arg(cache, use_cache, dual_cache),
                              cache_interval=optional_number("cache_interval", cache_interval, int))
        harness_settings(sampler_fields, early=True)  # every value checked before the model loads
        self.accelerator = distributed_accelerator()
        if self.accelerator is not None:  # lm-eval shards the requests by rank and gathers the results
            device = str(self.accelerator.device)
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.em = load_eval_model(optional_value(model_path), tokenizer=optional_value(tokenizer),
                                  device=resolve_device(optional_value(device)),
                                  dtype=dtype, lora_path=optional_value(lora_path),
                                  ups_head_path=optional_value(ups_head_path),
                                  mask_id=mask_id, pad_id=padding_id, smdm_size=optional_value(smdm_size))
        self.tokenizer = self.em.tokenizer
        self.settings = harness_settings(sampler_fields, max_length_of(self.em.model), max_length)
        check_decoding(self.em.model, self.settings)
        self.model_path = optional_value(model_path) or "embedded"
        self._window: Optional[PromptWindow] = None
        self.sampler_cost = Trajectory(record_steps=False)  # NFE and tokens/s of every generate_until sampler call

    @property
    def window(self) -> PromptWindow:
        """The cropping rule of every sampling entry point for max_length (remedi_patches.sampling.harness_window)."""
        self._window = harness_window(self._window, max_length_of(self.em.model), self.max_length,
                                      self.settings.gen_length)
        return self._window

    @property
    def device(self) -> torch.device:
        return self.em.device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @property
    def tokenizer_name(self) -> str:
        return self.model_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return backbone_forward(self.em.model, x)[0]

    def encode_pair(self, context: str, continuation: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(context ids, continuation ids): the whole text is tokenised once and split after the context's tokens."""
        context, continuation = split_pair(context, continuation)
        whole = self.tokenizer(context + continuation)["input_ids"]
        context_len = len(self.tokenizer(context)["input_ids"])
        ids = torch.tensor(whole, dtype=torch.long, device=self.device)
        return ids[:context_len], ids[context_len:]

    def is_greedy(self, prefix: torch.Tensor, target: torch.Tensor) -> bool:
        """Does the sampler, one token per step by confidence over the whole answer, decode exactly `target`?"""
        greedy = SamplerSettings(steps=len(target), gen_length=len(target), block_length=len(target),
                                 cfg_scale=self.settings.cfg_scale)
        out = sample(self.em, prefix[None], None, greedy)
        return bool((out[0, len(prefix):] == target).all())

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for request in tqdm(requests, desc="llada_dist loglikelihood"):
            prefix, target = self.encode_pair(*request.args)
            if len(prefix) + len(target) > self.max_length:
                raise ValueError(f"context + continuation is {len(prefix)} + {len(target)} tokens, more than "
                                 f"max_length={self.max_length}; raise max_length in --model_args")
            logprob = mc_loglikelihood(self._logits, prefix, target, mask_id=self.em.mask_id, mc_num=self.mc_num,
                                       batch_size=self.batch_size, cfg_scale=self.settings.cfg_scale)
            out.append((logprob, self.is_check_greedy and self.is_greedy(prefix, target)))
        return out

    def loglikelihood_rolling(self, requests: list[Instance]):
        raise NotImplementedError("llada_dist has no rolling (perplexity) log-likelihood; masked-diffusion LMs are "
                                  "scored with loglikelihood (Monte Carlo) or generate_until tasks")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="llada_dist generate_until"):
            chunk = requests[start:start + self.batch_size]
            prompts = self.window.crop([self.tokenizer(r.args[0])["input_ids"] for r in chunk])
            answers = generate_answer_ids(self.em, prompts, self.settings, micro_batch=self.batch_size,
                                          trajectory=self.sampler_cost)
            for request, answer in zip(chunk, answers):
                gen_kwargs = request.args[1]
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else until
                out.append(decode_answer(self.tokenizer, answer, gen_kwargs.get("max_gen_toks"), until))
        if requests:
            logger.info("llada_dist sampler: %s (%d sampler calls so far)", self.sampler_cost.cost(),
                        self.sampler_cost.calls)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
