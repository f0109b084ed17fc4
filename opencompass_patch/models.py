"""OpenCompass model classes for LLaDA-style masked-diffusion LMs, sampling through remedi_patches.sampling.sample.

    LLaDAModel       chat models (LLaDA-8B-Instruct): the prompt's turns go through the tokenizer's chat template
    LLaDABaseModel   base models (LLaDA-8B-Base, SMDM, the embedded tiny model): raw prompt text, stop words

The two differ only in their default `chat` key, which means what --chat means in generate.py / eval_gsm_math.py:
'on' (LLaDAModel) = the chat template, 'off' (LLaDABaseModel) = the prompt text as the dataset config's template
wrote it, 'auto' = the chat template when the tokenizer has one.

Both are registered with opencompass.registry.MODELS (import this module, or name the class in a config as
`from opencompass_patch.models import LLaDAModel`). Config keys, besides OpenCompass's own (type, abbr,
max_out_len, batch_size, run_cfg):

    path                   model folder / hub name / SMDM export or checkpoint; None or 'embedded' = the embedded model
    tokenizer_path         tokenizer when the model folder has none
    smdm_size              architecture of an SMDM iter-*-ckpt.pth checkpoint, e.g. 'Diff_LLaMA_170M'
    gen_steps, gen_length, gen_blocksize   sampler steps, answer canvas length, block length; None (the default)
                           = from the model's window as in generate.py (LLaDA-8B: 128 / 128 / 32, the embedded
                           model: 32 / 32 / 32)
    temperature, cfg, remasking            as generate.py (cfg = cfg_scale)
    diff_logits_eos_inf, diff_confidence_eos_eot_inf   generate.py's logits_eos_inf / confidence_eos_eot_inf
    mask_id, padding_id    None = the backbone's mask id / the tokenizer's pad (else EOS) id
    batch_size_            prompts per sampler call (OpenCompass's batch_size is how many prompts one
                           generate() receives; they are sampled batch_size_ at a time, left-padded)
    confidence_source      None (upstream sampling) | 'ups' | 'tps_prob' | 'random' | 'margin' | 'entropy'
    remask                 None: dynamic sources re-mask, upstream never does; False: never re-mask
    ups_temperature        'ups' ranking: 0 = greedy top-k_i, > 0 = Plackett-Luce draws from softmax(UPS / temperature)
    decoding               None = by the model (block diffusion with a KV cache for a dual-stream RemeDi, LLaDA's
                           sampler otherwise) | 'llada' | 'block' (generate.py --decoding)
    threshold, factor      parallel decoding (generate.py --threshold / --factor, at most one; Fast-dLLM uses 0.9 /
                           1): per step commit every masked position whose confidence passes, at least one; None =
                           the fixed schedule
    cache, cache_interval  LLaDA-style decoding's approximate KV cache (generate.py --cache / --cache_interval):
                           'prefix' | 'dual' | None = exact; refreshed once per block, or every cache_interval steps
                           of it; not with block decoding (which caches exactly)
    ups_head_path, lora_path   UPS head .safetensors and PEFT LoRA folder (train_remedi.py outputs);
                           `ups_head` is accepted as the older name of ups_head_path; a dual-stream RemeDi
                           (path = its folder or hub name) has its own UPS and takes no head
    device, dtype          None / 'auto' = cuda if available else cpu; dtype 'auto' = bfloat16 on CUDA, the
                           checkpoint's dtype elsewhere
    max_seq_len            prompt + gen_length budget, capped by the model's own window; longer prompts keep their
                           last tokens with ONE warning per model (remedi_patches.sampling.PromptWindow, the rule of
                           every sampling entry point); a gen_length that leaves no room is refused when loading
    stop_words             the answer text is cut at the earliest one (also OpenCompass's stopping_criteria)
    meta_template          OpenCompass prompt meta template
    chat                   'auto' | 'on' | 'off'; None = the class's ('on' for LLaDAModel, 'off' for LLaDABaseModel)

After each generate() call one INFO line gives the sampler's cost so far ('NFE 6, 812.4 tokens/s': model forwards
per sampler call, answer positions filled per second); the model keeps it in `sampler_cost` (a
remedi_patches.remasking.Trajectory counting every sampler call).

max_out_len: the sampler always fills a canvas of gen_length tokens (its block / step schedule depends on
it); the answer is then cut at its first EOS / EoT token and to at most max_out_len tokens. Set
gen_length <= max_out_len to make the cut a no-op.

Likelihood benchmarks (get_ppl / get_loglikelihood) are not served here: use eval_llada.py
(lm-evaluation-harness, LLaDA's Monte Carlo estimator).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from opencompass.models.base import BaseModel, LMTemplateParser
from opencompass.models.base_api import APITemplateParser
from opencompass.registry import MODELS
from opencompass.utils.logging import get_logger
from opencompass.utils.prompt import PromptList

from remedi_patches.backbones import load_eval_model, max_length_of
from remedi_patches.model_args import resolve_device
from remedi_patches.remasking import Trajectory
from remedi_patches.sampling import (CHAT_CHOICES, PromptWindow, SamplerSettings, check_decoding, decode_answer,
                                     generate_answer_ids, harness_settings, harness_window, optional_number,
                                     optional_value, uses_chat)

logger = get_logger()
PromptType = Union[PromptList, str]

# OpenCompass HuggingFace-model keys that upstream LLaDA configs carry but that mean nothing here
IGNORED_KEYS = frozenset({"hf_cache_dir", "tokenizer_kwargs", "tokenizer_only", "model_kwargs", "generation_kwargs",
                          "extract_pred_after_decode", "batch_padding", "pad_token_id", "mode", "end_str",
                          "use_fastchat_template", "mc_num", "sync_rank"})
ROLE_NAMES = {"HUMAN": "user", "BOT": "assistant", "SYSTEM": "system"}
CHAT_META_TEMPLATE = dict(
    round=[dict(role="HUMAN", api_role="HUMAN"), dict(role="BOT", api_role="BOT", generate=True)],
    reserved_roles=[dict(role="SYSTEM", api_role="SYSTEM")],
)

IN_CONFIG = " in the model config"  # where a bad value was given (optional_number)


def chat_messages(prompt: PromptType) -> list[dict]:
    """An OpenCompass prompt (a string or a list of {'role', 'prompt'} turns) -> chat messages,
    empty turns dropped and consecutive turns of one role merged with a newline."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages: list[dict] = []
    for turn in prompt:
        if not turn["prompt"]:
            continue
        role = ROLE_NAMES[turn["role"]]
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + turn["prompt"]
        else:
            messages.append({"role": role, "content": turn["prompt"]})
    return messages


def plain_text(prompt: PromptType) -> str:
    """An OpenCompass prompt -> one string (the turns' texts joined as they are)."""
    return prompt if isinstance(prompt, str) else "".join(turn["prompt"] for turn in prompt)


@MODELS.register_module()
class LLaDAModel(BaseModel):
    """LLaDA-style chat model: prompts go through the tokenizer's chat template. See the module docstring."""

    default_chat = "on"

    def __init__(self, path: Optional[str] = None, *, tokenizer_path: Optional[str] = None, max_seq_len: int = 4096,
                 meta_template: Optional[dict] = None, stop_words: Sequence[str] = (), cfg: float = 0.0,
                 temperature: float = 0.0, remasking: str = "low_confidence", mask_id: Optional[int] = None,
                 padding_id: Optional[int] = None, gen_steps: Optional[int] = None,
                 gen_length: Optional[int] = None, gen_blocksize: Optional[int] = None, batch_size_: int = 1,
                 diff_confidence_eos_eot_inf: bool = False,
                 diff_logits_eos_inf: bool = False, confidence_source: Optional[str] = None,
                 remask: Optional[bool] = None, ups_head_path: Optional[str] = None, lora_path: Optional[str] = None,
                 smdm_size: Optional[str] = None, chat: Optional[str] = None, ups_temperature: float = 0.0,
                 decoding: Optional[str] = None, threshold: Optional[float] = None, factor: Optional[float] = None,
                 cache: Optional[str] = None, cache_interval: Optional[int] = None, device: Optional[str] = None,
                 dtype: Optional[str] = "auto", **other):
        if "ups_head" in other:  # the older name of the key
            if ups_head_path is not None:
                raise ValueError("both ups_head and ups_head_path are set; keep ups_head_path (the head file) only")
            ups_head_path = other.pop("ups_head")
        unknown = sorted(set(other) - IGNORED_KEYS)
        if "peft_path" in unknown:
            raise ValueError("peft_path is called lora_path here (a PEFT LoRA folder); rename the config key")
        if unknown:
            raise ValueError(f"{type(self).__name__} got unknown config keys {unknown}; check their spelling "
                             "against the keys listed in opencompass_patch/models.py")
        for key in sorted(other):
            logger.warning("%s ignores the config key %s=%r", type(self).__name__, key, other[key])
        super().__init__(path=path or "embedded", max_seq_len=max_seq_len, meta_template=meta_template)
        self.template_parser = self._template_parser(meta_template)
        self._sampler_fields = dict(steps=gen_steps, gen_length=gen_length, block_length=gen_blocksize,
                                    temperature=temperature, cfg_scale=cfg, remasking=remasking,
                                    logits_eos_inf=diff_logits_eos_inf,
                                    confidence_eos_eot_inf=diff_confidence_eos_eot_inf,
                                    confidence_source=optional_value(confidence_source), remask=remask,
                                    ups_temperature=ups_temperature, decoding=optional_value(decoding),
                                    threshold=optional_number("threshold", threshold, where=IN_CONFIG),
                                    factor=optional_number("factor", factor, where=IN_CONFIG),
                                    cache=optional_value(cache),
                                    cache_interval=optional_number("cache_interval", cache_interval, int,
                                                                   where=IN_CONFIG))
        self._settings(None, early=True)  # every value checked before the model loads
        self.chat = optional_value(chat) or self.default_chat
        if self.chat not in CHAT_CHOICES:
            raise ValueError(f"chat={chat!r} in the model config; use one of {list(CHAT_CHOICES)} (None = "
                             f"{self.default_chat!r} for {type(self).__name__})")
        if batch_size_ < 1:
            raise ValueError(f"batch_size_ must be >= 1, got {batch_size_}")
        self.micro_batch = batch_size_
        self.stop_words = list(stop_words)
        ups_head_path, lora_path = optional_value(ups_head_path), optional_value(lora_path)
        if ups_head_path and self._sampler_fields["confidence_source"] != "ups":
            logger.warning("ups_head_path=%s is loaded but only used with confidence_source='ups' (got %r)",
                           ups_head_path, self._sampler_fields["confidence_source"])
        self.em = load_eval_model(optional_value(path), tokenizer=optional_value(tokenizer_path),
                                  device=resolve_device(optional_value(device)),
                                  dtype=dtype, lora_path=lora_path, ups_head_path=ups_head_path, mask_id=mask_id,
                                  pad_id=padding_id, smdm_size=optional_value(smdm_size))
        self.tokenizer = self.em.tokenizer
        self.settings = self._settings(max_length_of(self.em.model))
        check_decoding(self.em.model, self.settings)
        self._window: Optional[PromptWindow] = None
        self.sampler_cost = Trajectory(record_steps=False)  # NFE and tokens/s of every generate() sampler call
        logger.info("%s sampler: %s, mask_id=%s, padding_id=%s, ups_head_path=%s, lora_path=%s",
                    type(self).__name__, self.settings, self.em.mask_id, self.em.pad_id, ups_head_path, lora_path)

    def _settings(self, model_window: Optional[int], early: bool = False) -> Optional[SamplerSettings]:
        try:
            return harness_settings(self._sampler_fields, model_window, self.max_seq_len, early)
        except ValueError as err:
            raise ValueError(f"{err} (in the model config: steps = gen_steps, block_length = gen_blocksize, "
                             "cfg_scale = cfg)") from None

    @property
    def window(self) -> PromptWindow:
        """The cropping rule of every sampling entry point for max_seq_len (remedi_patches.sampling.harness_window)."""
        self._window = harness_window(self._window, max_length_of(self.em.model), self.max_seq_len,
                                      self.settings.gen_length)
        return self._window

    def _template_parser(self, meta_template: Optional[dict]):
        return APITemplateParser(meta_template or CHAT_META_TEMPLATE)

    def encode_prompt(self, prompt: PromptType) -> list[int]:
        """The prompt's token ids: its turns through the chat template (chat 'on', or 'auto' with a template), else
        its text as written with the tokenizer's own special tokens."""
        if self.chat == "on" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.path} has no chat template; evaluate this base model with "
                             "LLaDABaseModel instead of LLaDAModel (or set chat='auto' or 'off')")
        if uses_chat(self.tokenizer, self.chat):
            text = self.tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True,
                                                      tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(plain_text(prompt))["input_ids"]

    def get_token_len(self, prompt: PromptType) -> int:
        return len(self.encode_prompt(prompt))

    def generate(self, inputs: list[PromptType], max_out_len: Optional[int] = None,
                 stopping_criteria: Sequence[str] = ()) -> list[str]:
        """Answers for a list of prompts, cut at EOS / EoT, to max_out_len tokens and at the first stop word."""
        prompts = self.window.crop([self.encode_prompt(p) for p in inputs])
        answers = generate_answer_ids(self.em, prompts, self.settings, micro_batch=self.micro_batch,
                                      trajectory=self.sampler_cost)
        if inputs:
            logger.info("%s sampler: %s (%d sampler calls so far)", type(self).__name__, self.sampler_cost.cost(),
                        self.sampler_cost.calls)
        stops = list(dict.fromkeys([*self.stop_words, *stopping_criteria]))
        return [decode_answer(self.tokenizer, a, max_out_len, stops) for a in answers]

    def get_ppl(self, inputs, mask_length=None):
        raise NotImplementedError("masked-diffusion LMs have no left-to-right perplexity; for likelihood benchmarks "
                                  "use eval_llada.py (lm-evaluation-harness, Monte Carlo estimator)")

    get_loglikelihood = get_ppl
    get_ppl_tokenwise = get_ppl


@MODELS.register_module()
class LLaDABaseModel(LLaDAModel):
    """LLaDA-style base model: raw prompt text (the tokenizer's own special tokens added), stop words."""

    default_chat = "off"

    def _template_parser(self, meta_template: Optional[dict]):
        return LMTemplateParser(meta_template)
