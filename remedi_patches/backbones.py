"""One loader for every backbone the sampler, trainers and evaluators accept.

    load_backbone(None)                       the embedded tiny model shipped in remedi_patches/embedded/assets
    load_backbone("GSAI-ML/LLaDA-8B-Base")    a hub name (needs the hub, or a warm HF cache)
    load_backbone("/models/LLaDA-8B-Base")    a local transformers folder (config.json, model_type "llada")
    load_backbone("/runs/smdm_export")        a folder written by lit_gpt.model.save_smdm_folder
    load_backbone("iter-010000-ckpt.pth", smdm_size="Diff_LLaMA_170M", tokenizer="TinyLlama/...")
                                              an SMDM training checkpoint

Every path returns a `Backbone`: the model in eval mode, its tokenizer and the special ids the
sampler needs, so callers never branch on the backbone type.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded" / "assets" / "backbone"
LLADA_MASK_ID = 126336
SMDM_CONFIG = "smdm_config.json"


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: object  # a transformers tokenizer
    mask_id: int
    eos_id: Optional[int]
    eot_id: Optional[int]
    name: str
    kind: str  # "llada" (transformers) or "smdm" (lit_gpt TransEncoder)


def _dtype(dtype: str | torch.dtype | None) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _special_ids(tokenizer) -> tuple[Optional[int], Optional[int]]:
    eos = tokenizer.eos_token_id
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in tokenizer.get_vocab() else None
    return eos, eot


def _load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load a tokenizer from {source!r} ({err}); pass --tokenizer with a local tokenizer "
            "folder or a hub name that is reachable"
        ) from err


def _load_transformers(source: str, dtype: Optional[torch.dtype]) -> nn.Module:
    from transformers import AutoModel

    from remedi_patches import llada  # noqa: F401  (registers model_type "llada" with the Auto classes)

    try:
        return AutoModel.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {source!r}: {err}\nIf this machine cannot reach the Hugging Face hub, "
            "download the model elsewhere (huggingface-cli download <name> --local-dir DIR) and pass DIR."
        ) from err


def _checkpoint_vocab(model_file: Path) -> dict:
    """{"vocab_size": N} when a train_mdm / train_sft checkpoint records a --vocab_size override, else {}."""
    if model_file.suffix != ".pth":
        return {}
    try:
        ckpt = torch.load(model_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable here: lit_gpt.model.load_weights raises the clear error
        return {}
    vocab = (ckpt.get("hparams") or {}).get("vocab_size") if isinstance(ckpt, dict) else None
    return {} if vocab is None else {"vocab_size": int(vocab)}


def _load_smdm(model_file: Path, config_name: Optional[str], dtype: Optional[torch.dtype]) -> nn.Module:
    from lit_gpt.model import TransEncoder, load_smdm_folder, load_weights

    if model_file.is_dir():
        return load_smdm_folder(model_file, dtype=dtype)
    if config_name is None:
        raise ValueError(
            f"{model_file} is an SMDM training checkpoint; say which architecture it holds with "
            "--smdm_size Diff_LLaMA_<N>M (e.g. Diff_LLaMA_170M)"
        )
    model = TransEncoder.from_name(config_name, **_checkpoint_vocab(model_file))
    load_weights(model, model_file)
    return model.to(dtype) if dtype is not None else model


def load_backbone(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    smdm_size: Optional[str] = None,
    tokenizer: str | Path | None = None,
) -> Backbone:
    """Load a backbone and its tokenizer; see the module docstring for the accepted sources."""
    dtype = _dtype(dtype)
    if name_or_path is None or str(name_or_path) == "embedded":
        if not (EMBEDDED_DIR / SMDM_CONFIG).is_file():
            raise FileNotFoundError(
                f"the embedded backbone is missing from {EMBEDDED_DIR}; rebuild it with "
                "`python -m remedi_patches.embedded.build`"
            )
        name_or_path = EMBEDDED_DIR
    source = Path(name_or_path)
    tokenizer_source = tokenizer

    if source.exists():
        if source.is_file() or (source / SMDM_CONFIG).is_file():
            kind = "smdm"
            model = _load_smdm(source, smdm_size, dtype)
            tokenizer_source = tokenizer_source or (source if source.is_dir() else None)
            if tokenizer_source is None:
                raise ValueError(f"{source} holds no tokenizer; pass --tokenizer (a folder or hub name)")
        elif (source / "config.json").is_file():
            kind = "llada"
            model = _load_transformers(str(source), dtype)
            tokenizer_source = tokenizer_source or source
        else:
            raise FileNotFoundError(
                f"{source} is neither a transformers model folder (config.json), an SMDM export "
                f"({SMDM_CONFIG} + model.safetensors) nor an SMDM checkpoint file (.pth)"
            )
    elif "/" in str(name_or_path) and not str(name_or_path).startswith((".", "/")):
        kind = "llada"
        model = _load_transformers(str(name_or_path), dtype)
        tokenizer_source = tokenizer_source or str(name_or_path)
    else:
        raise FileNotFoundError(f"no model at {name_or_path!r}: not a local path and not a hub name (org/name)")

    tok = _load_tokenizer(tokenizer_source)
    eos_id, eot_id = _special_ids(tok)
    if kind == "smdm":
        mask_id = model.config.mask_id
    else:
        mask_id = getattr(model.config, "mask_token_id", None) or LLADA_MASK_ID
    model.to(device).eval()
    return Backbone(model=model, tokenizer=tok, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id,
                    name=str(name_or_path), kind=kind)


@dataclass
class EvalModel:
    model: nn.Module  # the backbone, wrapped by PEFT when a LoRA adapter was loaded
    tokenizer: object
    ups_head: Optional[nn.Module]
    mask_id: int
    pad_id: int
    eos_id: Optional[int]
    eot_id: Optional[int]
    device: torch.device

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an answer (EOS, EoT)."""
        return [t for t in (self.eos_id, self.eot_id) if t is not None]


def resolve_dtype(dtype: Optional[str], device: str) -> Optional[str]:
    """'auto' -> bfloat16 on CUDA, the checkpoint's dtype elsewhere (as generate.py's --dtype auto)."""
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else None
    return dtype


def load_eval_model(path: Optional[str] = None, *, tokenizer: Optional[str] = None, device: Optional[str] = None,
                    dtype: Optional[str] = "auto", lora_path: Optional[str] = None, ups_head: Optional[str] = None,
                    mask_id: Optional[int] = None, pad_id: Optional[int] = None,
                    smdm_size: Optional[str] = None) -> EvalModel:
    """Backbone (None / 'embedded' = the embedded tiny model), then the LoRA adapter, then the UPS head.

    mask_id / pad_id None take the backbone's mask id and the tokenizer's pad id (else its EOS id).
    """
    from remedi_patches.modeling_wrappers import check_head_fits, load_lora, load_ups_head

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this torch has no CUDA device; pass device cpu "
                         "(lm-eval: --device cpu, OpenCompass: device='cpu' in the model config)")
    for name, value in (("lora_path", lora_path), ("ups_head", ups_head)):
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"{name}={value!r} does not exist; pass the folder / .safetensors file written by "
                                    f"SMDM/pretrain/train_remedi.py, or leave {name} unset")
    backbone = load_backbone(path, device=device, dtype=resolve_dtype(dtype, device), smdm_size=smdm_size,
                             tokenizer=tokenizer)
    model = load_lora(backbone.model, lora_path) if lora_path else backbone.model
    head = None
    if ups_head:
        head, meta = load_ups_head(ups_head, map_location=device)
        check_head_fits(head, model)
        if meta.get("mask_id") not in (None, backbone.mask_id):
            logger.warning("UPS head %s was trained with mask id %s, the backbone uses %s", ups_head, meta["mask_id"],
                           backbone.mask_id)
    if mask_id is not None and mask_id != backbone.mask_id:
        logger.warning("mask_id=%s given, but the backbone %s uses %s; sampling with %s", mask_id, backbone.name,
                       backbone.mask_id, mask_id)
    if pad_id is None:
        pad_id = backbone.tokenizer.pad_token_id
        pad_id = backbone.eos_id if pad_id is None else pad_id
    if pad_id is None:
        raise ValueError(f"the tokenizer of {backbone.name} has neither a pad nor an EOS token; set padding_id "
                         "to a token id of this model")
    return EvalModel(model=model, tokenizer=backbone.tokenizer, ups_head=head,
                     mask_id=backbone.mask_id if mask_id is None else mask_id, pad_id=pad_id,
                     eos_id=backbone.eos_id, eot_id=backbone.eot_id, device=torch.device(device))
