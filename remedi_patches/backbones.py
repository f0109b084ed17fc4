r"""Every backbone the sampler, trainers and evaluators accept: ONE registry entry per kind, and one loader.

    load_backbone(None)                       the embedded tiny model shipped in remedi_patches/embedded/assets
    load_backbone("embedded_remedi")          the embedded dual-stream RemeDi shipped beside it
    load_backbone("GSAI-ML/LLaDA-8B-Base")    a hub name (needs the hub, or a warm HF cache)
    load_backbone("/models/LLaDA-8B-Base")    a local transformers folder (config.json, model_type "llada")
    load_backbone("/runs/smdm_export")        a folder written by lit_gpt.model.save_smdm_folder
    load_backbone("iter-010000-ckpt.pth", smdm_size="Diff_LLaMA_170M", tokenizer="TinyLlama/...")
                                              an SMDM training checkpoint

Every path returns a `Backbone`: the model in eval mode, its tokenizer and the special ids the sampler needs, so
callers never branch on the backbone type. Whether a value is a local path or a hub name follows
`remedi_patches.sources` (a missing local path is reported as such, never as a failed download).

Adding a backbone is one `register_backbone(BackboneKind(...))` call (see the two built-in entries at the end of
this file): how to recognise its files, its loader and mask id, the module path of its final norm and its hidden
size (for the UPS head's hook, `modeling_wrappers`), its LoRA targets for `--lora_target auto`, its transformer
block classes (FSDP auto-wrap units) and its context length. `kind_of(model)` tells which entry a loaded module
belongs to, through PEFT / UPSModel / Fabric wrappers. For example (a hypothetical SEDD backbone):

    register_backbone(BackboneKind(
        name="sedd", lora_targets=r".*blocks\.\d+\.(attn_qkv|attn_out)", block_classes=lambda: (DDiTBlock,),
        final_norm="norm_final", hidden_size=lambda config: config.hidden_size,
        model_types=("remedi_patches.sedd.model.SEDD",), recognise=lambda path: (path / "sedd.json").is_file(),
        load=load_sedd, mask_id=lambda model, tokenizer: model.config.vocab_size))

A module of no registered kind (a test toy, a research prototype) still works with the wrappers when it follows
the convention: `config.hidden_size`, and either a forward taking `output_hidden_states` or a final norm named
`norm` (see UNREGISTERED_FINAL_NORM).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from remedi_patches.sources import hub_reachable, hub_unreachable_message, is_hub_name, resolve_source
from remedi_patches.sedd import loading as sedd_loading

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded" / "assets" / "backbone"
EMBEDDED_REMEDI_DIR = EMBEDDED_DIR.parent / "remedi"  # the dual-stream RemeDi trained on it (embedded.remedi)
EMBEDDED_SEDD_DIR = EMBEDDED_DIR.parent / "sedd"  # the tiny SEDD on the same task (remedi_patches.sedd.embedded)
EMBEDDED_NAMES = {"embedded": EMBEDDED_DIR, "embedded_remedi": EMBEDDED_REMEDI_DIR,  # model names of the shipped
                  "embedded_sedd": EMBEDDED_SEDD_DIR}
EMBEDDED_BUILDERS = {"embedded": "remedi_patches.embedded.build", "embedded_remedi": "remedi_patches.embedded.remedi",
                     "embedded_sedd": "remedi_patches.sedd.embedded"}  # `python -m <builder> --install` rebuilds
LLADA_MASK_ID = 126336
SMDM_CONFIG = "smdm_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
UNREGISTERED_FINAL_NORM = "norm"  # final norm of a module of no registered kind (the convention above)

Source = Union[str, Path]  # a hub name (str) or an existing local path (Path)


@dataclass(frozen=True)
class LoadOptions:
    """What a user may add to the backbone's name; a kind ignores what it does not need."""
    dtype: Optional[torch.dtype] = None
    tokenizer: Optional[Source] = None     # tokenizer folder / hub name when the source holds none
    smdm_size: Optional[str] = None        # architecture of a bare SMDM checkpoint (Diff_LLaMA_<N>M)


@dataclass(frozen=True)
class BackboneKind:
    """One backbone family. Every callable is lazy: nothing heavy is imported until the kind is used."""
    name: str                                         # Backbone.kind, meta["backbone_kind"] of heads
    lora_targets: str                                 # regex over module names for --lora_target auto
    block_classes: Callable[[], tuple[type, ...]]     # transformer block classes (FSDP auto-wrap units)
    final_norm: str                                   # module path (below the base model) of the final norm
    hidden_size: Callable[[object], int]              # config -> hidden size d
    model_types: tuple[str, ...]                      # "module.QualName" of its model classes (for kind_of)
    recognise: Callable[[Path], bool]                 # an existing local file / folder of this kind?
    load: Callable[[Source, LoadOptions], tuple[nn.Module, object]]  # -> (model, tokenizer)
    mask_id: Callable[[nn.Module, object], Optional[int]]  # (model, tokenizer) -> [MASK] id (None: a kind without)
    hub_names: Callable[[str], bool] = field(default=lambda name: False)  # loads this hub name (org/name)?
    max_length: Callable[[object], Optional[int]] = field(default=lambda config: None)  # config -> context
    sources: str = ""                                 # what a user passes, for error messages
    # the model from its config alone on the meta device (no weights read) and its tokenizer when one is at hand
    # (else None): load_backbone(..., device="meta"); None: the kind cannot
    build_meta: Optional[Callable[[Source, LoadOptions], tuple[nn.Module, object]]] = None


_KINDS: dict[str, BackboneKind] = {}


def register_backbone(kind: BackboneKind, replace: bool = False) -> BackboneKind:
    """Add a backbone kind. Sources are matched newest entry first, so a specific kind registered later wins
    over a broad built-in one (e.g. another transformers model_type over "llada"'s any-config.json rule)."""
    if kind.name in _KINDS and not replace:
        raise ValueError(f"backbone kind {kind.name!r} is already registered; pick another name or pass replace=True")
    _KINDS.pop(kind.name, None)
    _KINDS[kind.name] = kind
    return kind


def unregister_backbone(name: str) -> None:
    _KINDS.pop(name, None)


def backbone_kinds() -> list[BackboneKind]:
    """Registered kinds, newest first (the order sources are matched in)."""
    return list(reversed(_KINDS.values()))


def backbone_kind(name: str) -> BackboneKind:
    if name not in _KINDS:
        raise ValueError(f"unknown backbone kind {name!r}; registered: {sorted(_KINDS)} "
                         "(add one with remedi_patches.backbones.register_backbone)")
    return _KINDS[name]


def fsdp_block_classes(kinds: Optional[list[str]] = None) -> set[type]:
    """Transformer block classes of the given kinds (default: every registered kind), for FSDP auto-wrap."""
    chosen = [backbone_kind(k) for k in kinds] if kinds is not None else list(_KINDS.values())
    return {cls for kind in chosen for cls in kind.block_classes()}


def unwrap(model: nn.Module) -> nn.Module:
    """The model under UPSModel / PEFT / Fabric / DDP / FSDP / torch.compile wrappers (the object holding .config
    and the layers)."""
    from remedi_patches.modeling_wrappers import UPSModel

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = None
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            inner = model.get_base_model()
        elif isinstance(model, UPSModel):
            inner = model.backbone
        elif type(model).__name__ == "_FabricModule":
            inner = getattr(model, "_forward_module", None)
        elif type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
            inner = getattr(model, "module", None)
        elif type(model).__name__ == "OptimizedModule":  # torch.compile
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def kind_of(model: nn.Module) -> Optional[BackboneKind]:
    """The registered kind a loaded module belongs to (seen through wrappers), or None. Imports nothing."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(unwrap(model)).__mro__}
    return next((k for k in backbone_kinds() if names.intersection(k.model_types)), None)


def max_length_of(model: nn.Module) -> Optional[int]:
    """Longest sequence the backbone takes (its context), or None when unknown."""
    kind = kind_of(model)
    config = getattr(unwrap(model), "config", None)
    return kind.max_length(config) if kind is not None and config is not None else None


# ---------------------------------------------------------------- loading


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: object  # a transformers tokenizer
    mask_id: Optional[int]  # None only for a uniform-graph SEDD, which has no [MASK] state
    eos_id: Optional[int]
    eot_id: Optional[int]
    name: str
    kind: str  # a registered BackboneKind.name ("llada", "smdm", ...)


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


def load_tokenizer(source: Source, what: str = "tokenizer"):
    """A transformers tokenizer from a local folder or a hub name; errors name the source (as `what`: the
    tokenizer, or the model whose folder / hub repo holds it) and the fix."""
    from transformers import AutoTokenizer

    if is_hub_name(source):
        try:
            return AutoTokenizer.from_pretrained(str(source), local_files_only=not hub_reachable())
        except Exception as err:  # noqa: BLE001  (hub client errors are of several libraries' types)
            if isinstance(err, (ImportError, MemoryError)):
                raise
            raise FileNotFoundError(hub_unreachable_message(str(source), err, what)) from err
    path = resolve_source(source, what)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); pass --tokenizer "
                                "with a tokenizer folder or hub name")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise FileNotFoundError(
            f"could not load a tokenizer from {str(path)!r} ({detail}); pass --tokenizer with a folder holding "
            "tokenizer.json / tokenizer_config.json"
        ) from err


def detect_kind(source: Source) -> BackboneKind:
    """The registered kind that loads `source` (hub name or existing local path); ValueError if none does."""
    if isinstance(source, str):
        kind = next((k for k in backbone_kinds() if k.hub_names(source)), None)
        if kind is None:
            raise ValueError(f"no registered backbone kind loads hub name {source!r}; pass a local folder")
        return kind
    kind = next((k for k in backbone_kinds() if k.recognise(source)), None)
    if kind is None:
        accepted = "; ".join(f"{k.name}: {k.sources}" for k in backbone_kinds())
        raise FileNotFoundError(f"{source} is not a backbone this project can load. Accepted: {accepted}")
    return kind


def embedded_folder(name: str | Path | None) -> Optional[Path]:
    """The shipped folder a model name stands for (None / 'embedded': the embedded backbone; 'embedded_remedi': the
    embedded RemeDi; 'embedded_sedd': the embedded SEDD), or None for any other name. FileNotFoundError with the
    rebuild command when it is missing."""
    if name is not None and str(name) not in EMBEDDED_NAMES:
        return None
    name = "embedded" if name is None else str(name)
    folder = EMBEDDED_NAMES[name]
    if not ((folder / SMDM_CONFIG).is_file() or (folder / "config.json").is_file()):
        raise FileNotFoundError(f"the {name} model is missing from {folder}; rebuild it with "
                                f"`python -m {EMBEDDED_BUILDERS[name]} --install`")
    return folder


def load_backbone(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    smdm_size: Optional[str] = None,
    tokenizer: str | Path | None = None,
) -> Backbone:
    """Load a backbone and its tokenizer; see the module docstring for the accepted sources.

    device="meta" builds the model from its config alone (no weights read, no memory; kinds with `build_meta`:
    LLaDA and the dual-stream RemeDi). Backbone.tokenizer is then the tokenizer when one is at hand (--tokenizer, or
    tokenizer files in the local folder), else None; eos_id then comes from the model's config."""
    options = LoadOptions(dtype=_dtype(dtype), tokenizer=tokenizer, smdm_size=smdm_size)
    name_or_path = embedded_folder(name_or_path) or name_or_path
    source = resolve_source(name_or_path, "model")
    kind = detect_kind(source)
    if torch.device(device).type == "meta":
        if kind.build_meta is None:
            able = [k.name for k in backbone_kinds() if k.build_meta is not None]
            raise ValueError(f"device='meta' builds a model from its config alone for the kinds {able}; {source} is "
                             f"a {kind.name!r} backbone, which cannot: load it on cpu instead")
        model, tok = kind.build_meta(source, options)
    else:
        model, tok = kind.load(source, options)
    eos_id, eot_id = _special_ids(tok) if tok is not None else (getattr(model.config, "eos_token_id", None), None)
    mask_id = kind.mask_id(model, tok)
    model.to(device).eval()
    return Backbone(model=model, tokenizer=tok, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id,
                    name=str(name_or_path), kind=kind.name)


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
                    dtype: Optional[str] = "auto", lora_path: Optional[str] = None,
                    ups_head_path: Optional[str] = None, mask_id: Optional[int] = None, pad_id: Optional[int] = None,
                    smdm_size: Optional[str] = None) -> EvalModel:
    """Backbone (None / 'embedded' = the embedded tiny model), then the LoRA adapter, then the UPS head.

    ups_head_path: the head's .safetensors file (or its folder); EvalModel.ups_head is the loaded module.
    mask_id / pad_id None take the backbone's mask id and the tokenizer's pad id (else its EOS id).
    """
    from remedi_patches.modeling_wrappers import check_head_fits, has_ups_stream, load_lora, load_ups_head

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this torch has no CUDA device; pass device cpu "
                         "(lm-eval: --device cpu, OpenCompass: device='cpu' in the model config)")
    for name, value in (("lora_path", lora_path), ("ups_head", ups_head_path)):
        if value is not None and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"{name} path {str(value)!r} does not exist; pass the folder / .safetensors file "
                                    f"written by SMDM/pretrain/train_remedi.py, or leave {name} unset")
    head = meta = None
    if ups_head_path:  # read (and check for NaN / inf) before the backbone: a bad head fails in a second
        head, meta = load_ups_head(ups_head_path, map_location=device)
    backbone = load_backbone(path, device=device, dtype=resolve_dtype(dtype, device), smdm_size=smdm_size,
                             tokenizer=tokenizer)
    if backbone.mask_id is None:
        raise ValueError(f"{backbone.name} is a SEDD with the uniform graph, which has no [MASK] token, so no masked-"
                         "diffusion sampler can decode it; sample it with python SMDM/sedd/sample.py")
    model = load_lora(backbone.model, lora_path) if lora_path else backbone.model
    if head is not None:
        if has_ups_stream(model):
            raise ValueError(f"{backbone.name} is a dual-stream RemeDi with its own UPS stream, so a UPS head does "
                             f"not apply to it; drop the head (--ups_head / ups_head_path {ups_head_path}) and use "
                             "confidence_source 'ups' alone")
        check_head_fits(head, model)
        if meta.get("mask_id") not in (None, backbone.mask_id):
            logger.warning("UPS head %s was trained with mask id %s, the backbone uses %s", ups_head_path,
                           meta["mask_id"], backbone.mask_id)
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


# ---------------------------------------------------------------- built-in kinds: LLaDA (transformers)


def _llada_weight_file(folder: Path, tensor: str) -> str:
    """The safetensors file of `folder` that holds `tensor` (for error messages)."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return str(folder / json.loads(index.read_text())["weight_map"][tensor])
    except (ValueError, KeyError):
        pass
    single = folder / "model.safetensors"
    return str(single) if single.is_file() else str(folder)


def _llada_hub(source: str, load: Callable[..., nn.Module]) -> nn.Module:
    """load(local_files_only=...) for a hub name; a hub that cannot deliver is one FileNotFoundError saying so."""
    try:
        return load(local_files_only=not hub_reachable())
    except Exception as err:  # noqa: BLE001  (hub client errors are of several libraries' types)
        if not isinstance(err, (OSError, ValueError)) and type(err).__module__.split(".")[0] not in (
                "huggingface_hub", "requests", "httpx", "urllib3"):
            raise
        raise FileNotFoundError(hub_unreachable_message(source, err)) from err


def _load_llada(source: Source, options: LoadOptions) -> tuple[nn.Module, object]:
    """A LLaDA-family folder or hub name: the dual-stream RemeDi class for RemeDi checkpoints (remedi_patches.llada
    .loading), else the transformers Auto classes."""
    from lit_gpt.model import first_nonfinite
    from remedi_patches import llada  # registers model_types "llada" and "RemeDi" with the Auto classes

    tokenizer = (load_tokenizer(options.tokenizer) if options.tokenizer is not None  # first: a missing tokenizer
                 else load_tokenizer(source, "model"))                                # must not cost an 8B load

    def load(**hub) -> nn.Module:  # strict: missing / unexpected tensors are one ValueError naming them
        return llada.load_llada(str(source), dtype=options.dtype, **hub)

    if isinstance(source, str):  # a hub name
        return _llada_hub(source, load), tokenizer
    try:
        model = load()
    except OSError as err:
        raise FileNotFoundError(f"could not load the transformers model folder {source} ({err}); check that it "
                                "holds config.json and its weight files, or re-download it") from err
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise ValueError(f"{_llada_weight_file(source, bad)}: tensor {bad!r} holds NaN or inf values; "
                         "re-download or re-save the model (the run that wrote it diverged)")
    return model, tokenizer


def _build_llada_meta(source: Source, options: LoadOptions) -> tuple[nn.Module, object]:
    """The LLaDA / RemeDi model of a folder's (or hub repo's) config.json on the meta device; no weights read."""
    from remedi_patches import llada

    tokenizer = None
    if options.tokenizer is not None:
        tokenizer = load_tokenizer(options.tokenizer)
    elif isinstance(source, Path) and any((source / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(source, "model")

    def build(**hub) -> nn.Module:
        return llada.build_on_meta(source, options.dtype, **hub)

    if isinstance(source, str):
        return _llada_hub(source, build), tokenizer
    try:
        return build(), tokenizer
    except OSError as err:
        raise FileNotFoundError(f"could not read the model config of {source} ({err}); check that it holds a "
                                "config.json") from err


def _llada_mask_id(model: nn.Module, tokenizer) -> int:
    return getattr(model.config, "mask_token_id", None) or LLADA_MASK_ID


def _llada_blocks() -> tuple[type, ...]:
    from remedi_patches.llada import LLaDABlock

    return (LLaDABlock,)


# LoRA targets: the attention and MLP projections of the main blocks and, in a dual-stream RemeDi, of the UPS
# blocks (blocks_upm) too; the feedback linears and the confidence linear are not adapted (train them fully)
register_backbone(BackboneKind(
    name="llada",
    lora_targets=r".*blocks(_upm)?\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    block_classes=_llada_blocks,
    final_norm="model.transformer.ln_f",
    hidden_size=lambda config: int(config.d_model),
    model_types=("remedi_patches.llada.modeling_llada.LLaDAModelLM",),
    recognise=lambda path: path.is_dir() and (path / "config.json").is_file(),
    load=_load_llada,
    mask_id=_llada_mask_id,
    hub_names=lambda name: True,  # any org/name: the transformers Auto classes resolve it
    max_length=lambda config: getattr(config, "max_sequence_length", None),
    sources="a transformers folder (config.json, model_type llada or RemeDi) or a hub name org/name",
    build_meta=_build_llada_meta,
))


# ---------------------------------------------------------------- built-in kinds: SMDM (lit_gpt TransEncoder)


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


def _load_smdm(source: Source, options: LoadOptions) -> tuple[nn.Module, object]:
    from lit_gpt.model import TransEncoder, load_smdm_folder, load_weights

    source = Path(source)
    if source.is_dir():
        tokenizer = load_tokenizer(options.tokenizer or source)
        return load_smdm_folder(source, dtype=options.dtype), tokenizer
    if options.smdm_size is None:
        raise ValueError(
            f"{source} is an SMDM training checkpoint; say which architecture it holds with "
            "--smdm_size Diff_LLaMA_<N>M (e.g. Diff_LLaMA_170M)"
        )
    if options.tokenizer is None:
        raise ValueError(f"{source} holds no tokenizer; pass --tokenizer (a folder or hub name)")
    tokenizer = load_tokenizer(options.tokenizer)
    model = TransEncoder.from_name(options.smdm_size, **_checkpoint_vocab(source))
    load_weights(model, source)
    return (model.to(options.dtype) if options.dtype is not None else model), tokenizer


def _smdm_blocks() -> tuple[type, ...]:
    from lit_gpt.model import Block

    return (Block,)


register_backbone(BackboneKind(
    name="smdm",
    lora_targets=r".*\.h\.\d+\.(attn\.attn|attn\.proj|mlp\.swiglu\.w1|mlp\.swiglu\.w2|mlp\.swiglu\.w3)",
    block_classes=_smdm_blocks,
    final_norm="transformer.ln_f",
    hidden_size=lambda config: int(config.n_embd),
    model_types=("lit_gpt.model.TransEncoder",),
    recognise=lambda path: path.is_file() or (path / SMDM_CONFIG).is_file(),
    load=_load_smdm,
    mask_id=lambda model, tokenizer: int(model.config.mask_id),
    max_length=lambda config: getattr(config, "block_size", None),
    sources=f"an SMDM export folder ({SMDM_CONFIG} + model.safetensors) or an SMDM checkpoint file (.pth, "
            ".safetensors) with --smdm_size and --tokenizer",
))


# ---------------------------------------------------------------- SEDD (remedi_patches.sedd; its forward is
# model(indices, sigma) -> log scores, not the (ids, attention_mask) -> logits the LLaDA-style samplers call)
register_backbone(BackboneKind(
    name="sedd",
    lora_targets=r".*blocks\.\d+\.(attn_qkv|attn_out)",
    block_classes=sedd_loading.backbone_blocks,
    final_norm="output_layer.norm_final",
    hidden_size=lambda config: int(config.hidden_size),
    model_types=("remedi_patches.sedd.model.SEDD",),
    recognise=sedd_loading.is_sedd_source,
    load=sedd_loading.load_backbone_sedd,
    mask_id=sedd_loading.backbone_mask_id,
    hub_names=sedd_loading.is_sedd_hub_name,
    max_length=lambda config: getattr(config, "length", None),
    sources=sedd_loading.BACKBONE_SOURCES,
    build_meta=sedd_loading.build_meta_backbone_sedd,
))
