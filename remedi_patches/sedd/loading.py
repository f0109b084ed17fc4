"""Read and write SEDD checkpoints in the upstream layouts.

    load_sedd("/models/sedd-small")          a hub-layout folder: config.json (the full hydra config dict) and
                                             model.safetensors or pytorch_model.bin
    load_sedd("exp_local/openwebtext/run")   an upstream run folder: .hydra/config.yaml and
                                             checkpoints-meta/checkpoint.pth (else the newest
                                             checkpoints/checkpoint_N.pth); its EMA weights are loaded
                                             (ema=False: the raw training weights)
    load_sedd("louaaron/sedd-small")         a hub name (huggingface_hub.snapshot_download, then the folder)

Every load is strict: a missing or unexpected tensor, a shape that does not fit, NaN / inf weights or a missing file
is one ValueError / FileNotFoundError naming the folder and the problem. `save_sedd` writes the hub layout, which
`load_sedd` and upstream's `SEDD.from_pretrained` both read.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch

from remedi_patches.sources import hub_reachable, hub_unreachable_message, is_hub_name, resolve_source

from .model import SEDD, SEDDConfig, rotary_inv_freq

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the hub mixin writes the first, older ones the second
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
META_CHECKPOINT = Path("checkpoints-meta") / "checkpoint.pth"
CHECKPOINT_DIR = "checkpoints"
UPSTREAM_KEYS = ("tokens", "graph", "noise", "model")

Source = Union[str, Path]


# ---------------------------------------------------------------- recognising the layouts


def _json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_upstream_config(d: Optional[dict]) -> bool:
    """An upstream SEDD hydra dict: tokens, and graph / noise / model sections (model with a hidden_size)."""
    return (isinstance(d, dict) and all(key in d for key in UPSTREAM_KEYS)
            and all(isinstance(d[key], dict) for key in ("graph", "noise", "model")) and "hidden_size" in d["model"])


def is_sedd_folder(path: Path) -> bool:
    """A hub-layout folder whose config.json is an upstream SEDD config (weights not checked)."""
    path = Path(path)
    return path.is_dir() and is_upstream_config(_json(path / CONFIG_FILE))


def run_checkpoint(run: Path) -> Optional[Path]:
    """The checkpoint a run folder resumes from: checkpoints-meta/checkpoint.pth, else the highest
    checkpoints/checkpoint_N.pth; None when there is neither."""
    meta = run / META_CHECKPOINT
    if meta.is_file():
        return meta
    numbered = []
    for file in (run / CHECKPOINT_DIR).glob("checkpoint_*.pth"):
        match = re.fullmatch(r"checkpoint_(\d+)\.pth", file.name)
        if match:
            numbered.append((int(match.group(1)), file))
    return max(numbered)[1] if numbered else None


def is_sedd_run(path: Path) -> bool:
    """An upstream run folder: .hydra/config.yaml and a checkpoint (see `run_checkpoint`)."""
    path = Path(path)
    return path.is_dir() and (path / HYDRA_CONFIG).is_file() and run_checkpoint(path) is not None


def is_sedd_checkpoint_file(path: Path) -> bool:
    """<run>/checkpoints-meta/checkpoint.pth or <run>/checkpoints/checkpoint_N.pth of an upstream run."""
    path = Path(path)
    return path.is_file() and path.suffix == ".pth" and (path.parent.parent / HYDRA_CONFIG).is_file()


def is_sedd_source(path: Path) -> bool:
    """A local path `load_sedd` reads: hub-layout folder, run folder, or a run's checkpoint file."""
    return is_sedd_folder(path) or is_sedd_run(path) or is_sedd_checkpoint_file(path)


# ---------------------------------------------------------------- configs


def read_hydra_config(path: Path) -> dict:
    """A run's .hydra/config.yaml as a plain dict: with OmegaConf (interpolations resolved when they can be) when
    it is installed, else with PyYAML (interpolations left as text; the model keys never use them)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        OmegaConf = None
    try:
        if OmegaConf is None:
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            cfg = OmegaConf.load(path)
            try:
                data = OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # noqa: BLE001  (a hydra-only resolver such as ${now:...}): keep the text
                data = OmegaConf.to_container(cfg, resolve=False)
    except Exception as err:  # noqa: BLE001  (yaml / omegaconf parse errors are of several types)
        raise ValueError(f"{path} is not readable YAML ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a mapping (an upstream SEDD hydra config)")
    return data


def read_config(folder: Path) -> SEDDConfig:
    """The SEDDConfig of a hub-layout folder (config.json) or a run folder (.hydra/config.yaml)."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        data, where = _json(folder / CONFIG_FILE), folder / CONFIG_FILE
        if data is None:
            raise ValueError(f"{where} is not a JSON object; re-download or re-save the SEDD folder {folder}")
    elif (folder / HYDRA_CONFIG).is_file():
        data, where = read_hydra_config(folder / HYDRA_CONFIG), folder / HYDRA_CONFIG
    else:
        raise FileNotFoundError(f"{folder} is not a SEDD checkpoint: it holds neither {CONFIG_FILE} (hub layout) nor "
                                f"{HYDRA_CONFIG} (an upstream run folder)")
    try:
        return SEDDConfig.from_upstream_dict(data)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{where}: {err}") from err


# ---------------------------------------------------------------- weights


def _read_weights(folder: Path) -> tuple[dict, Path]:
    """(state dict, file) of a hub-layout folder."""
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(file)), file
            return torch.load(file, map_location="cpu", weights_only=True), file
        except Exception as err:  # noqa: BLE001  (safetensors / pickle errors are of several types)
            raise ValueError(f"{file} is truncated or corrupt ({type(err).__name__}: {err}); download or save the "
                             "SEDD folder again") from err
    raise FileNotFoundError(f"the SEDD folder {folder} holds {CONFIG_FILE} but no weights (none of "
                            f"{', '.join(WEIGHT_FILES)})")


def _read_run_weights(run: Path, ema: bool) -> tuple[dict | list, Path]:
    """The EMA shadow parameters (a list in model.parameters() order) or the raw `model` state dict of a run."""
    file = run_checkpoint(run) if run.is_dir() else run
    if file is None:
        raise FileNotFoundError(f"the SEDD run folder {run} holds no checkpoint ({META_CHECKPOINT} or "
                                f"{CHECKPOINT_DIR}/checkpoint_N.pth)")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{file} is not a readable SEDD checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{file} is not an upstream SEDD checkpoint (a dict with model, ema, optimizer, step)")
    if ema:
        shadow = (ckpt.get("ema") or {}).get("shadow_params") if isinstance(ckpt.get("ema"), dict) else None
        if not isinstance(shadow, (list, tuple)):
            raise ValueError(f"{file} holds no EMA weights (ema.shadow_params); load it with ema=False for the raw "
                             "training weights")
        return list(shadow), file
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds no `model` state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}, file


def _check_finite(model: SEDD, where: Path) -> None:
    from lit_gpt.model import first_nonfinite

    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise ValueError(f"{where}: tensor {bad!r} holds NaN or inf values; use an earlier checkpoint (the run that "
                         "wrote it diverged)")


def _load_state(model: SEDD, state: dict, where: Path) -> None:
    """Strict load with one ValueError naming what does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{label} {names[:5]}{' ...' if len(names) > 5 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if names]
        raise ValueError(f"{where} does not fit the SEDD its config describes: {'; '.join(parts)}. Use the config "
                         "saved with these weights")
    model.load_state_dict(state, strict=True, assign=True)


def _load_shadow(model: SEDD, shadow: list, where: Path) -> None:
    """Copy EMA shadow parameters (model.parameters() order) into the model."""
    params = list(model.named_parameters())
    if len(shadow) != len(params):
        raise ValueError(f"{where}: the EMA holds {len(shadow)} tensors, the SEDD its config describes has "
                         f"{len(params)} parameters; use the .hydra/config.yaml of the run that wrote it")
    state = {}
    for (name, param), tensor in zip(params, shadow):
        if not torch.is_tensor(tensor) or tuple(tensor.shape) != tuple(param.shape):
            shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{where}: EMA tensor for {name} has shape {shape}, the model's is {tuple(param.shape)}")
        state[name] = tensor
    state["rotary_emb.inv_freq"] = rotary_inv_freq(model.config.head_dim)  # a buffer: not in the EMA
    model.load_state_dict(state, strict=True, assign=True)


# ---------------------------------------------------------------- public API


def build_sedd_meta(source: Source) -> SEDD:
    """The SEDD a local folder's config describes, on the meta device (no weights read)."""
    config = read_config(Path(source))
    with torch.device("meta"):
        return SEDD(config)


def _hub_folder(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, local_files_only=not hub_reachable()))
    except Exception as err:  # noqa: BLE001  (hub client errors are of several libraries' types)
        if isinstance(err, (ImportError, MemoryError)):
            raise
        raise FileNotFoundError(hub_unreachable_message(name, err)) from err


def load_sedd(source: Source, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
              ema: bool = True) -> SEDD:
    """A SEDD in eval mode from a hub-layout folder, an upstream run folder (EMA weights unless ema=False), a run's
    checkpoint .pth file, or a hub name; dtype None keeps the stored dtype (float32 upstream)."""
    if isinstance(source, str) and is_hub_name(source):
        folder = _hub_folder(source)
    else:
        folder = Path(resolve_source(source, "SEDD model"))
    if folder.is_file():  # <run>/checkpoints-meta/checkpoint.pth or <run>/checkpoints/checkpoint_N.pth
        run, ckpt_file = folder.parent.parent, folder
    else:
        run, ckpt_file = folder, None
    config = read_config(run)
    with torch.device("meta"):
        model = SEDD(config)
    if (run / CONFIG_FILE).is_file() and ckpt_file is None:
        state, where = _read_weights(run)
        _load_state(model, state, where)
    else:
        weights, where = _read_run_weights(ckpt_file or run, ema)
        if isinstance(weights, list):
            _load_shadow(model, weights, where)
        else:
            weights.setdefault("rotary_emb.inv_freq", rotary_inv_freq(config.head_dim))
            _load_state(model, weights, where)
    _check_finite(model, where)
    model.to(device=device, dtype=dtype)
    return model.eval()


def save_sedd(model: SEDD, folder: Source, tokenizer=None) -> Path:
    """Write the hub layout into `folder`: config.json (the upstream hydra dict), model.safetensors (float32, as
    upstream's) and, when given, the tokenizer's files. Each file is written under a temporary name and renamed, so an
    interrupted save never leaves a half-written file under the final name. NaN / inf weights are refused."""
    from lit_gpt.model import write_model_folder

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # upstream's layout: float32
    state["rotary_emb.inv_freq"] = rotary_inv_freq(model.config.head_dim)  # exact even if the model ran in bf16
    save_tokenizer = None if tokenizer is None else (lambda path: tokenizer.save_pretrained(str(path)))
    return write_model_folder(folder, state, model.config.to_upstream_dict(), "the SEDD", WEIGHT_FILES[0],
                              CONFIG_FILE, before_config=save_tokenizer)


# ---------------------------------------------------------------- the "sedd" entry of remedi_patches.backbones

GPT2_TOKENIZER = "openai-community/gpt2"  # upstream's GPT2TokenizerFast("gpt2"), under its hub org/name
SEDD_HUB_NAME = re.compile(r"louaaron/sedd-[\w.-]+", re.IGNORECASE)
BACKBONE_SOURCES = (f"a SEDD hub-layout folder ({CONFIG_FILE} with tokens / graph / noise / model, and "
                    f"{' or '.join(WEIGHT_FILES)}), an upstream run folder ({HYDRA_CONFIG} + {META_CHECKPOINT}) or "
                    "louaaron/sedd-*")


def is_sedd_hub_name(name: str) -> bool:
    return bool(SEDD_HUB_NAME.fullmatch(name))


def _backbone_tokenizer(source: Source, options, required: bool):
    """--tokenizer, else the folder's tokenizer files, else GPT-2's (upstream's tokenizer); None when not
    `required` and none is at hand locally."""
    from remedi_patches.backbones import TOKENIZER_FILES, load_tokenizer

    if options.tokenizer is not None:
        return load_tokenizer(options.tokenizer)
    if isinstance(source, Path) and source.is_dir() and any((source / n).is_file() for n in TOKENIZER_FILES):
        return load_tokenizer(source, "model")
    return load_tokenizer(GPT2_TOKENIZER) if required else None


def _check_vocab(model: SEDD, tokenizer, source: Source) -> None:
    if tokenizer is not None and len(tokenizer) > model.config.tokens:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the SEDD {source} embeds "
                         f"{model.config.tokens} (config tokens): pass the tokenizer it was trained with (--tokenizer)")


def load_backbone_sedd(source: Source, options) -> tuple[SEDD, object]:
    """BackboneKind.load: (model, tokenizer); the tokenizer is read first, so a missing one costs no weight load."""
    tokenizer = _backbone_tokenizer(source, options, required=True)
    model = load_sedd(source, dtype=options.dtype)
    _check_vocab(model, tokenizer, source)
    return model, tokenizer


def build_meta_backbone_sedd(source: Source, options) -> tuple[SEDD, object]:
    """BackboneKind.build_meta: the model of a local folder's config on the meta device."""
    if isinstance(source, str):
        raise ValueError(f"device='meta' needs a local SEDD folder; download {source} first")
    model = build_sedd_meta(source if source.is_dir() else source.parent.parent)
    if options.dtype is not None:
        model.to(options.dtype)
    tokenizer = _backbone_tokenizer(source, options, required=False)
    _check_vocab(model, tokenizer, source)
    return model, tokenizer


def backbone_mask_id(model: SEDD, tokenizer) -> Optional[int]:
    """The absorbing state (= config tokens); None for a uniform-graph SEDD, which has none (the SEDD tools sample
    and train it; load_eval_model, which feeds masked-diffusion samplers, refuses it)."""
    return model.config.mask_token_id


def backbone_blocks() -> tuple[type, ...]:
    from .model import DDiTBlock

    return (DDiTBlock,)


def sedd_model_name(name: str) -> str:
    """'embedded' in a SEDD tool means the embedded SEDD ('embedded_sedd'; the plain name elsewhere is the embedded
    masked-diffusion backbone); any other name is returned unchanged."""
    return "embedded_sedd" if name == "embedded" else name
