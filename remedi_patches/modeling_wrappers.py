"""TPS logits and UPS logits from one backbone forward, for every backbone the project supports.

    backbone_forward(model, ids, am, need_hidden)  the one function that talks to backbones:
        transformers-style models (forward takes `output_hidden_states`) -> hidden_states[-1];
        models returning a bare logits tensor (SMDM TransEncoder) -> forward hook on the final norm named by the
        backbone's registry entry (remedi_patches.backbones); PEFT / UPSModel wrappers are seen through.
    UPSModel(backbone, head)   forward(ids, attention_mask, *, position_ids, past_key_values, use_cache)
                               -> RemeDiOutput(logits, confidences); the cache arguments (remedi_patches.kv_cache)
                               go to the backbone, so a backbone + head decodes by blocks too
    has_ups_stream(model)      the model gives its own UPS confidences (dual-stream RemeDi: no head applies)
    ups_input_forward(model, ids, am, position_ids, need_ups)   TPS logits + the UPS's input (a dual-stream
                               model's confidences, or the hidden state a head reads)
    ups_stream_parts(model)    its UPS-stream parameters and feedback parameters (the rest is the main stream)
    save_ups_head / load_ups_head   safetensors + JSON metadata, atomic save, loading never runs code,
                                    NaN / inf refused on both sides
    check_head_fits, hidden_size_of, load_lora
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from remedi_patches.backbones import UNREGISTERED_FINAL_NORM, kind_of, unwrap
from remedi_patches.ups_head import UPSHead

HEAD_FORMAT = "remedi-ups-head"
HEAD_FORMAT_VERSION = 1
HEAD_FILE_NAME = "ups_head.safetensors"


class RemeDiOutput(NamedTuple):
    logits: torch.Tensor      # (B, L, V) TPS logits
    confidences: torch.Tensor  # (B, L) UPS logits h (raw, no sigmoid): the name the dual-stream models use too


def logits_of(output: Any) -> torch.Tensor:
    """Logits from whatever a model returns: a bare tensor, an object with .logits, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    "the model must return a logits tensor or an object with .logits")


def base_model(model: nn.Module) -> nn.Module:
    """The model under PEFT / UPSModel / Fabric wrappers (the object holding .config and the layers)."""
    return unwrap(model)


@functools.lru_cache(maxsize=None)
def _forward_takes_hidden_flag(cls: type) -> bool:
    return "output_hidden_states" in inspect.signature(cls.forward).parameters


def _takes_output_hidden_states(model: nn.Module) -> bool:
    return _forward_takes_hidden_flag(type(base_model(model)))


def final_norm(model: nn.Module) -> nn.Module:
    """The final norm module whose output is the last hidden state (for the forward hook): the module path of
    the backbone's registry entry, or `norm` for a module of no registered kind."""
    base = base_model(model)
    kind = kind_of(base)
    name = kind.final_norm if kind is not None else UNREGISTERED_FINAL_NORM
    try:
        return base.get_submodule(name)
    except AttributeError:
        pass
    where = f"its registry entry ({kind.name!r}) names {name!r}" if kind is not None else (
        f"it is of no registered backbone kind and has no module named {name!r}")
    raise ValueError(
        f"cannot find the final norm of {type(base).__name__}: {where}; give its forward an output_hidden_states "
        "argument, or register it with remedi_patches.backbones.register_backbone (final_norm=...)"
    )


def has_ups_stream(model: nn.Module) -> bool:
    """Whether the model (seen through wrappers) computes UPS confidences itself: the class attribute
    `has_ups_stream` of the dual-stream RemeDi models. Such a model decodes by blocks by default and takes no
    UPS head."""
    return bool(getattr(base_model(model), "has_ups_stream", False))


# parameter names of the two dual-stream models: SMDM (lit_gpt.dual_stream) and LLaDA (remedi_patches.llada)
UPS_STREAM_NAMES = re.compile(r"(^|\.)(ups\.(h|ln_f|confidence)|blocks_upm|ln_f_upm|linear_confidence)\.")
FEEDBACK_NAMES = re.compile(r"(^|\.)(ups\.feedback(_norm)?|backprop_linears|backprop_norms)\.")


def ups_stream_parts(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(UPS-stream parameters: its blocks, final norm and confidence linear; feedback parameters: the linears and
    norms that add the UPS state into the main stream) of a dual-stream model. Every other parameter belongs to
    the main stream (TPS); with the feedback untouched (zero at first) the TPS is the main stream's alone."""
    stream, feedback = [], []
    for name, param in model.named_parameters():
        if FEEDBACK_NAMES.search(name):
            feedback.append(param)
        elif UPS_STREAM_NAMES.search(name):
            stream.append(param)
    if not stream:
        raise ValueError(f"{type(base_model(model)).__name__} has no UPS-stream parameters (no dual-stream RemeDi)")
    return stream, feedback


def ups_input_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None,
                      need_ups: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One forward -> (TPS logits (B, L, V), what the UPS needs: a dual-stream model's own UPS logits (B, L), or a
    backbone's last hidden state (B, L, d) for a head; None unless need_ups). The mask and positions of Remask SFT
    rows (remedi_patches.block_layout) are passed on."""
    if has_ups_stream(model):
        out = model(input_ids, attention_mask=attention_mask,
                    **({} if position_ids is None else {"position_ids": position_ids}))
        return out.logits, out.confidences if need_ups else None
    return backbone_forward(model, input_ids, attention_mask, need_hidden=need_ups, position_ids=position_ids)


def backbone_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     need_hidden: bool = False, **cache_args: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One forward -> (logits (B, L, V), last hidden state after the final norm (B, L, d) or None).

    cache_args: position_ids / past_key_values / use_cache of block decoding (remedi_patches.kv_cache), passed to
    the model only when given (None / False values are dropped, so models without the cache keep working)."""
    cache_args = {name: value for name, value in cache_args.items() if value is not None and value is not False}
    if not need_hidden:
        return logits_of(model(input_ids, attention_mask=attention_mask, **cache_args)), None
    if _takes_output_hidden_states(model):
        output = model(input_ids, attention_mask=attention_mask, output_hidden_states=True, **cache_args)
        hidden_states = getattr(output, "hidden_states", None)
        if not hidden_states:
            raise RuntimeError(f"{type(base_model(model)).__name__} returned no hidden_states although "
                               "output_hidden_states=True was passed")
        return logits_of(output), hidden_states[-1]
    captured: list[torch.Tensor] = []
    handle = final_norm(model).register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        logits = logits_of(model(input_ids, attention_mask=attention_mask, **cache_args))
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the final norm of {type(base_model(model)).__name__} did not run during the forward")
    return logits, captured[-1]


def _known_hidden_size(model: nn.Module) -> Optional[int]:
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None:
        return None
    kind = kind_of(base)
    value = kind.hidden_size(config) if kind is not None else getattr(config, "hidden_size", None)
    return value if isinstance(value, int) else None


def hidden_size_of(model: nn.Module) -> int:
    """d of the backbone's last hidden state: from its registry entry, or `config.hidden_size` for a module of no
    registered kind."""
    size = _known_hidden_size(model)
    if size is None:
        raise ValueError(f"cannot read the hidden size of {type(base_model(model)).__name__}: it is of no registered "
                         "backbone kind and its config has no integer hidden_size; register it with "
                         "remedi_patches.backbones.register_backbone (hidden_size=...)")
    return size


def check_head_fits(head: UPSHead | dict, backbone: nn.Module) -> None:
    """ValueError when the head (or its saved meta) was built for another hidden size."""
    head_size = head["hidden_size"] if isinstance(head, dict) else head.hidden_size
    backbone_size = hidden_size_of(backbone)
    if head_size != backbone_size:
        raise ValueError(
            f"UPS head expects hidden size {head_size} but the backbone {type(base_model(backbone)).__name__} "
            f"has hidden size {backbone_size}; use a head trained on this backbone (or train one with "
            "SMDM/pretrain/train_remedi.py)"
        )


class UPSModel(nn.Module):
    """Backbone + UPS head: forward(input_ids, attention_mask, ...) -> RemeDiOutput from ONE backbone forward."""

    def __init__(self, backbone: nn.Module, head: UPSHead) -> None:
        super().__init__()
        if has_ups_stream(backbone):
            raise ValueError(f"{type(base_model(backbone)).__name__} has its own UPS stream (a dual-stream RemeDi); "
                             "a UPS head does not apply to it: use the model alone (drop --ups_head)")
        if _known_hidden_size(backbone) is not None:
            check_head_fits(head, backbone)
        self.backbone = backbone
        self.head = head

    @property
    def config(self):
        return getattr(self.backbone, "config", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                position_ids: Optional[torch.Tensor] = None, past_key_values=None,
                use_cache: bool = False) -> RemeDiOutput:
        """past_key_values: a remedi_patches.kv_cache.KVCache; the three cache arguments go to the backbone."""
        logits, hidden = backbone_forward(self.backbone, input_ids, attention_mask, need_hidden=True,
                                          position_ids=position_ids, past_key_values=past_key_values,
                                          use_cache=use_cache)
        if hidden.shape[-1] != self.head.hidden_size:
            raise ValueError(f"UPS head expects hidden size {self.head.hidden_size} but the backbone's last "
                             f"hidden state has size {hidden.shape[-1]}; use a head trained on this backbone")
        return RemeDiOutput(logits, self.head(hidden))


def save_ups_head(path: str | Path, head: UPSHead, meta: dict) -> Path:
    """Write head weights + JSON meta (hidden_size, width, mask_id, backbone, train_args, format) atomically."""
    from safetensors.torch import save_file

    from lit_gpt.model import first_nonfinite

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise ValueError(f"refusing to save the UPS head to {path}: tensor {bad!r} holds NaN or inf values "
                         "(training diverged); keep the last good head and retrain with a lower learning rate")
    path.parent.mkdir(parents=True, exist_ok=True)
    full_meta = {"mask_id": None, "backbone": None, "train_args": None, **meta,
                 "hidden_size": head.hidden_size, "width": head.width, "format_version": HEAD_FORMAT_VERSION}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": HEAD_FORMAT, "meta": json.dumps(full_meta, default=str)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_ups_head(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[UPSHead, dict]:
    """Read a head written by save_ups_head -> (head in eval mode, meta).

    A folder means <folder>/ups_head.safetensors. Only tensors and JSON are read: no code runs.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / HEAD_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no UPS head at {path}; pass the .safetensors file written by save_ups_head "
                                "(train_remedi.py --save_ups_head)")
    fix = "re-save the head with remedi_patches.modeling_wrappers.save_ups_head or point at the right file"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt headers
        with open(path, "rb") as raw:
            kind = "a torch pickle, not safetensors" if raw.read(2) == b"PK" else "truncated or corrupt"
        raise ValueError(f"{path} is not a readable UPS head ({kind}: {err}); {fix}") from err
    if header.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a UPS head (metadata format="
                         f"{header.get('format')!r}, expected {HEAD_FORMAT!r}); {fix}")
    try:
        meta = json.loads(header["meta"])
        head = UPSHead(int(meta["hidden_size"]), int(meta["width"]))
        head.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(f"{path}: UPS head metadata or weights do not match ({err}); {fix}") from err
    from lit_gpt.model import first_nonfinite

    bad = first_nonfinite(tensors)
    if bad is not None:
        raise ValueError(f"UPS head {path}: tensor {bad!r} holds NaN or inf values (the run that wrote it "
                         "diverged); use an earlier head, or retrain it with a lower learning rate")
    if meta.get("format_version", 0) > HEAD_FORMAT_VERSION:
        raise ValueError(f"{path} has head format version {meta['format_version']}, newer than this code "
                         f"({HEAD_FORMAT_VERSION}); update the remedi package")
    return head.to(map_location).eval(), meta


def load_lora(backbone: nn.Module, path: str | Path) -> nn.Module:
    """Wrap the backbone with the LoRA adapter saved in `path` (PEFT save_pretrained folder), eval mode."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter at {path} (adapter_config.json missing); pass the folder "
                                "written by train_remedi.py --save_lora_dir")
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError("--lora_path needs the peft package: pip install peft") from err
    return PeftModel.from_pretrained(backbone, str(path)).eval()
