"""The one training loop (`fit`) and what every trainer shares.

A trainer is "config dataclass + step function + CLI built from the dataclass":

    cfg = config_from_args(MyConfig, parser.parse_args(argv)); cfg.check()   # every flag, before any load
    with claim_outputs(cfg.out_dir, save_path=...):                           # writable? lock (2nd run refuses)
        fabric = setup_fabric(cfg, loggers=[csv_logger(cfg.out_dir)])
        state = {"model": model, "optimizer": opt, "step_count": 0, "iter_num": 0}
        result = fit(fabric, state, step_fn, [TrainGroup(model, opt, lr=cfg.lr)], schedule, cfg.out_dir, evaluate,
                     resume=resume_path(cfg.out_dir, cfg.resume), hparams=hparams_of(cfg))

`fit` contract (see its docstring): `step_fn(step, micro) -> (loss, metrics)` computes the loss of one
micro-batch of optimizer step `step` (it must depend only on its arguments and the weights, so a resumed run
continues the same trajectory); `groups` (a list, or a function of the step) says which modules and
optimizers that step updates; `state` is what every checkpoint holds. fit owns the rest: cosine LR per group,
gradient accumulation without gradient sync until the last micro-batch, clipping, the non-finite / divergence
guard, logging (CSVLogger metrics.csv + tqdm), validation, atomic checkpoints, resume and the run lock.

Config pieces shared by the trainers (fields declared once with remedi_patches.cli.arg): FabricConfig
(--accelerator --devices --num_nodes --strategy --precision --gradient_checkpointing, see
`apply_gradient_checkpointing`), RunConfig (--resume --divergence_factor), and for the SMDM trainers
SMDMModelConfig (--model --model_name --vocab_size) and OptimConfig.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from lightning_fabric import Fabric
from lightning_fabric.loggers import CSVLogger
from lightning_fabric.strategies import DDPStrategy, FSDPStrategy
from tqdm.auto import tqdm

from lit_gpt.config import Config, num_non_embedding_params
from lit_gpt.model import TransEncoder, first_nonfinite
from remedi_patches.backbones import unwrap
from remedi_patches.cli import UserError, arg
from remedi_patches.run_lock import RunLock
from remedi_patches.sources import is_hub_name, missing_path_message

CKPT_PATTERN = re.compile(r"^iter-(\d+)-ckpt\.pth$")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
DIVERGENCE_FACTOR = 10.0
LOSS_EMA = 0.1  # weight of the newest step in the running loss the divergence guard watches
# hparams whose change on resume does not move the trajectory (not listed in the resume warning)
NOT_TRAJECTORY = frozenset({"out_dir", "resume", "export_dir", "save_interval", "save_every", "eval_interval",
                            "eval_every", "eval_iters", "eval_mc", "save_path", "save_lora_dir", "accelerator",
                            "devices", "num_nodes", "strategy", "divergence_factor", "tokenizer",
                            "gradient_checkpointing"})


class TrainingDiverged(UserError):
    """The loss or a gradient became non-finite, or the loss grew past the divergence limit."""


# ---------------------------------------------------------------- config pieces (one declaration per flag)


@dataclass
class FabricConfig:
    accelerator: str = arg("auto", "hardware to run on", choices=ACCELERATORS, group="fabric")
    devices: int = arg(1, "devices (processes) per node", group="fabric")
    num_nodes: int = arg(1, "number of nodes", group="fabric")
    strategy: str = arg("auto", "auto: single device, or DDP when devices * num_nodes > 1; fsdp: full sharding, "
                        "one unit per transformer block (GPU only)", choices=STRATEGIES, group="fabric")
    precision: Optional[str] = arg(None, "default: bf16-mixed on a GPU that supports bf16, else 32-true",
                                   choices=PRECISIONS, group="fabric")
    gradient_checkpointing: bool = arg(False, "recompute every transformer block (main and UPS) in backward instead "
                                       "of keeping its activations: less memory for about one more forward per "
                                       "step, same losses", group="fabric")

    def check_fabric(self) -> None:
        for name in ("devices", "num_nodes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.strategy == "fsdp" and on_cpu(self.accelerator):
            raise UserError("--strategy fsdp needs GPUs (Fabric has no FSDP on CPU); use --strategy ddp on CPU.")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


@dataclass
class RunConfig:
    resume: str = arg("auto", "'auto': continue from the newest checkpoint in --out_dir if any; 'none': start "
                      "fresh; or a checkpoint path", group="run")
    divergence_factor: float = arg(DIVERGENCE_FACTOR, "stop when the running loss (EMA 0.1) exceeds this factor x "
                                   "its best value after warmup (0 disables); a non-finite loss or gradient always "
                                   "stops the run", group="run")

    def check_run(self) -> None:
        if not self.divergence_factor >= 0:
            raise UserError(f"--divergence_factor must be >= 0 (0 disables), got {self.divergence_factor}")
        if self.resume not in ("auto", "none") and not Path(self.resume).is_file():
            raise FileNotFoundError(f"--resume {self.resume}: no such checkpoint file; pass an existing "
                                    "iter-*-ckpt.pth, 'auto' or 'none'")


@dataclass
class ExportConfig:
    """What the SMDM trainers save besides --out_dir (whose default is each trainer's own)."""
    save_interval: int = arg(5000, "save a checkpoint every N optimizer steps (and always after the last one)",
                             group="run")
    seed: int = arg(3407, "seeds model init, data order and noise", group="run")
    export_dir: Optional[Path] = arg(None, "folder for the final model.safetensors + smdm_config.json; default "
                                     "<out_dir>/final", group="run")


@dataclass
class SMDMModelConfig:
    model: Optional[int] = arg(None, "upstream size in millions: 170 -> Diff_LLaMA_170M", group="model")
    model_name: Optional[str] = arg(None, "config name, e.g. Diff_LLaMA_170M or Diff_LLaMA_tiny", group="model")
    vocab_size: Optional[int] = arg(None, "override the config's vocabulary (tokenizer size; the mask id is this "
                                    "value)", group="model")


@dataclass
class OptimConfig:
    """AdamW + cosine schedule with SMDM's defaults (wd 0.1, betas (0.9, 0.95), clip 1.0)."""
    lr: float = arg(2e-4, "peak learning rate", group="optimisation")
    min_lr: float = arg(2e-5, "final learning rate of the cosine decay", group="optimisation")
    warmup_steps: Optional[int] = arg(None, "linear warmup steps, capped at max_steps; None: max(1%% of max_steps, "
                                      "100)", group="optimisation")
    weight_decay: float = arg(0.1, "AdamW weight decay", group="optimisation")
    beta1: float = arg(0.9, "AdamW beta1", group="optimisation")
    beta2: float = arg(0.95, "AdamW beta2", group="optimisation")
    grad_clip: float = arg(1.0, "gradient-norm clip (0 disables)", group="optimisation")
    micro_batch_size: Optional[int] = arg(None, "sequences per device per forward; default by model size as "
                                          "upstream (32/16/8/4)", group="optimisation")
    global_batch_size: int = arg(256, "sequences per optimizer step over all devices (gradient accumulation "
                                 "fills the gap)", group="optimisation")

    def check_optim(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)) or not 0 <= self.min_lr <= self.lr:
            raise UserError(f"--lr must be a positive number and --min_lr in [0, lr], got lr {self.lr}, "
                            f"min_lr {self.min_lr}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise UserError("--micro_batch_size and --global_batch_size must be >= 1")


def smdm_config(args) -> Config:
    """SMDM Config named by exactly one of --model / --model_name, with --vocab_size applied."""
    if (args.model is None) == (args.model_name is None):
        raise UserError("Pass exactly one of --model N (upstream size, e.g. 170) or --model_name NAME "
                        "(e.g. Diff_LLaMA_tiny).")
    if args.vocab_size is not None and args.vocab_size < 2:
        raise UserError(f"--vocab_size must be >= 2, got {args.vocab_size}")
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    name = args.model_name or f"Diff_LLaMA_{args.model}M"
    try:
        return Config.from_name(name, **overrides)
    except (KeyError, ValueError) as err:
        raise UserError(f"unknown model config {name!r} ({err}); pass --model_name Diff_LLaMA_<N>M or "
                        "Diff_LLaMA_tiny") from None


def hparams_of(cfg) -> dict:
    """A config dataclass (or argparse namespace) as plain values (paths as strings) for checkpoints and logs."""
    items = dataclasses.asdict(cfg).items() if dataclasses.is_dataclass(cfg) else vars(cfg).items()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in items
            if v is None or isinstance(v, (bool, int, float, str, Path))}


# ---------------------------------------------------------------- paths: found before any load


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def require_path(value: Optional[Union[str, Path]], flag: str, kind: str = "local") -> None:
    """FileNotFoundError naming the flag when a local path does not exist (checked before anything loads).

    kind "local": `value` is always a path. "model" (a backbone or tokenizer): a hub name org/name is left to the
    loader, anything else is a local path (the rule of remedi_patches.sources). "dataset": a local path when it
    starts with . / ~, ends in .json/.jsonl/.parquet, or is a path that is no hub name (data.load_records)."""
    if value is None or Path(str(value)).expanduser().exists():
        return
    text = str(value)
    if kind == "model" and is_hub_name(text):
        return
    if kind == "dataset" and not (text.startswith((".", "/", "~")) or text.endswith(DATA_FILE_SUFFIXES)
                                  or ("/" in text and not is_hub_name(text))):
        return
    raise FileNotFoundError(f"{flag}: {missing_path_message(text, 'local' if kind == 'local' else kind)}")


def check_writable_dir(folder: Union[str, Path], flag: str) -> Path:
    """Create `folder` and a probe file in it; a UserError naming the flag if that fails."""
    folder = Path(folder)
    probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{flag} {folder} is not a writable folder ({err.strerror or err}); pass a folder you can "
                        "write to") from None
    return folder


def check_writable_file(path: Union[str, Path], flag: str) -> Path:
    """The folder of `path` is writable and `path` is not a folder (a UserError naming the flag otherwise)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file path, e.g. {path / 'ups_head.safetensors'}")
    check_writable_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} exists and is not writable; pass another path")
    return path


def _launcher_child() -> bool:
    """True in the extra processes of a multi-device run (their rank 0 holds the locks)."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


@contextlib.contextmanager
def claim_outputs(out_dir: Union[str, Path], files: Mapping[str, Optional[Union[str, Path]]] = (),
                  folders: Mapping[str, Optional[Union[str, Path]]] = ()) -> Iterator[None]:
    """Before training: check that --out_dir and every output (flag -> file / folder) can be written, then hold
    a RunLock on each for the block, so a second run on the same output refuses (UserError naming the pid).
    Only the launching process locks; the ranks Fabric starts run inside its claim."""
    check_writable_dir(out_dir, "--out_dir")
    locks = [RunLock(out_dir)]
    for flag, path in dict(files).items():
        if path is not None:
            check_writable_file(path, flag)
            locks.append(RunLock.for_file(path))
    for flag, path in dict(folders).items():
        if path is not None:
            check_writable_dir(path, flag)
            locks.append(RunLock(path))
    with contextlib.ExitStack() as stack:
        if not _launcher_child():
            for lock in locks:
                stack.enter_context(lock)
        yield


# ---------------------------------------------------------------- fabric


def on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def default_precision(accelerator: str) -> str:
    on_gpu = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def make_strategy(strategy: str, devices: int, num_nodes: int, cpu: bool, wrap_blocks: Optional[set[type]] = None,
                  checkpoint_blocks: bool = False) -> Union[str, DDPStrategy, FSDPStrategy]:
    """Fabric strategy for the --strategy flag.

    ddp (also chosen by "auto" when devices * num_nodes > 1): NCCL on GPUs, gloo on CPU.
    fsdp (GPU only): full sharding with each module of a class in `wrap_blocks` (default SMDM's
    `Block`) as one unit, and full (unsharded) state dicts, so a checkpoint is one file whatever
    the strategy. checkpoint_blocks (--gradient_checkpointing): FSDP's checkpoint wrapper also recomputes
    each of those blocks in backward (`apply_gradient_checkpointing` then leaves the model alone).
    """
    if strategy == "fsdp":
        if cpu:
            raise UserError("--strategy fsdp needs GPUs (Fabric has no FSDP on CPU); use --strategy ddp on CPU.")
        if wrap_blocks is None:
            from lit_gpt.model import Block
            wrap_blocks = {Block}
        return FSDPStrategy(auto_wrap_policy=wrap_blocks, state_dict_type="full", limit_all_gathers=True,
                            cpu_offload=False,
                            activation_checkpointing_policy=wrap_blocks if checkpoint_blocks else None)
    if strategy == "ddp" or devices * num_nodes > 1:
        return DDPStrategy(process_group_backend="gloo" if cpu else None)
    return "auto"


def setup_fabric(cfg: FabricConfig, wrap_blocks: Optional[set[type]] = None,
                 loggers: Optional[list] = None) -> Fabric:
    """Create and launch a Fabric from FabricConfig fields (see `make_strategy`); returns it ready on every
    rank. With devices > 1 Fabric re-launches the running script once per extra device, so call this from a
    script's main, not from inside another program.
    """
    precision = cfg.precision or default_precision(cfg.accelerator)
    strategy = make_strategy(cfg.strategy, cfg.devices, cfg.num_nodes, on_cpu(cfg.accelerator), wrap_blocks,
                             cfg.gradient_checkpointing)
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                    strategy=strategy, precision=precision, loggers=loggers)
    fabric.launch()
    return fabric


def apply_gradient_checkpointing(model: torch.nn.Module, cfg: FabricConfig) -> None:
    """--gradient_checkpointing on `model` (any backbone the project trains, also under PEFT / UPSModel wrappers),
    before fabric.setup: every transformer block, main and UPS, is recomputed in backward (non-reentrant
    torch.utils.checkpoint) while the model trains with gradients. SMDM's TransEncoder and RemeDiTransEncoder: their
    `gradient_checkpointing` switch; LLaDA and RemeDi (transformers models): transformers' activation checkpointing
    of their LLaDABlocks. Nothing with --strategy fsdp: there setup_fabric's FSDPStrategy checkpoints the blocks."""
    if not cfg.gradient_checkpointing or cfg.strategy == "fsdp":
        return
    base = unwrap(model)
    if isinstance(base, TransEncoder):
        base.gradient_checkpointing = True
    elif getattr(base, "supports_gradient_checkpointing", False):
        # activation_checkpointing_enable is the newer transformers 5 name of gradient_checkpointing_enable
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        # transformers also makes the embeddings' output require grad, which only reentrant checkpoints need; without
        # this a frozen backbone (a UPS head trained alone) would build its whole autograd graph
        base.disable_input_require_grads()
    else:
        raise UserError(f"--gradient_checkpointing: {type(base).__name__} has no gradient checkpointing; drop the "
                        "flag, or train an SMDM or LLaDA backbone")


# ---------------------------------------------------------------- packed data: its vocabulary, the run's cost

PACKED_META_SUFFIX = "_meta.json"  # prepare_data.py writes <prefix>_meta.json beside <prefix>_*.bin


def write_packed_meta(out_dir: Path, prefix: str, tokenizer_path: Union[str, Path], vocab_size: int,
                      documents: int, tokens: int) -> Path:
    """Record which tokenizer made a folder of packed files, so the trainer can check the model's vocabulary
    and ship the tokenizer with its export."""
    import json

    source = Path(tokenizer_path)
    meta = {"tokenizer": str(source.resolve()) if source.exists() else str(tokenizer_path),
            "vocab_size": int(vocab_size), "documents": int(documents), "tokens": int(tokens)}
    path = Path(out_dir) / f"{prefix}{PACKED_META_SUFFIX}"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_packed_meta(data_dir: Union[str, Path]) -> Optional[dict]:
    """The prepare_data.py record of a folder of packed files (None for data packed without one). UserError
    when the folder mixes data of different tokenizers."""
    import json

    metas = {}
    for path in sorted(Path(data_dir).glob(f"*{PACKED_META_SUFFIX}")):
        try:
            metas[path] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable prepare_data.py record ({err}); delete it or re-run "
                            "prepare_data.py") from None
    sizes = {m.get("vocab_size") for m in metas.values()}
    if len(sizes) > 1:
        raise UserError(f"{data_dir} mixes packed data of tokenizers with vocabularies {sorted(sizes)}; keep one "
                        "tokenizer per data folder")
    return next(iter(metas.values()), None)


def packed_max_token(data_dir: Union[str, Path], sample: int = 1 << 22) -> int:
    """The largest token id among the first and the last `sample` tokens of the first and last chunk files of
    a packed folder: milliseconds, even for big data."""
    import numpy as np

    from lit_gpt.packed_dataset import HDR_SIZE, read_header

    files = sorted(Path(data_dir).glob("*.bin"))
    top = -1
    for f in {files[0], files[-1]} if files else ():
        dtype, n = read_header(f)
        tokens = np.memmap(f, dtype=dtype, mode="r", offset=HDR_SIZE, shape=(n,))
        for part in (tokens[:sample], tokens[-sample:]):
            if len(part):
                top = max(top, int(part.max()))
    return top


def check_data_vocab(data_dirs: Sequence[Union[str, Path, None]], vocab_size: int, model_name: str,
                     vocab_flag_given: bool) -> None:
    """Before training: UserError (one line, naming --vocab_size) when the packed data does not fit the model's
    vocabulary: a token id >= vocab_size (the model's [MASK] id), or data whose prepare_data.py record names a
    tokenizer of another size than the model's."""
    for data_dir in (d for d in data_dirs if d is not None):
        meta = read_packed_meta(data_dir)
        if meta is not None and meta.get("vocab_size") != vocab_size:
            hint = "fix --vocab_size" if vocab_flag_given else "pass --vocab_size"
            raise UserError(f"the packed data in {data_dir} was made with a tokenizer of {meta['vocab_size']} "
                            f"tokens ({meta.get('tokenizer')}) but {model_name} has vocab_size {vocab_size}; "
                            f"{hint} {meta['vocab_size']}")
        top = packed_max_token(data_dir)
        if top >= vocab_size:
            raise UserError(f"token id {top} in {data_dir} is >= vocab_size {vocab_size} of {model_name} (its mask "
                            "id); pass --vocab_size matching the tokenizer the data was prepared with")


def tokenizer_vocab_error(tokenizer, vocab_size: int, model_name: str) -> Optional[str]:
    """The one-line problem when `tokenizer` does not fit a model of `vocab_size` ids (the mask id is vocab_size),
    else None."""
    if len(tokenizer) > vocab_size:
        return (f"the tokenizer has {len(tokenizer)} tokens but {model_name} has vocab_size {vocab_size} (its mask "
                "id); use the tokenizer the model was trained with, or set --vocab_size")
    return None


def cpu_gflops(seconds: float = 0.05) -> float:
    """A quick measure of this process's float32 matmul speed (GFLOP/s)."""
    import time

    a = torch.randn(512, 512)
    torch.mm(a, a)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, a)
        n += 1
    return 2 * 512 ** 3 * n / (time.perf_counter() - start) / 1e9


def step_cost(config, global_batch: int, micro_batch: int, seq_len: int) -> tuple[float, float]:
    """(FLOPs of one optimizer step, bytes of one micro-batch's training memory), rough: 6 x parameters x
    tokens plus attention for the compute; float32 logits (and their gradient), per-layer activations,
    attention scores and AdamW state for the memory."""
    d, layers, vocab = config.n_embd, config.n_layer, config.padded_vocab_size
    params = num_non_embedding_params(config) + 2 * vocab * d
    flops = global_batch * seq_len * (6 * (params - vocab * d) + 12 * layers * d * seq_len)
    tokens = micro_batch * seq_len
    memory = 4 * (3 * tokens * vocab + 24 * layers * tokens * d
                  + 2 * layers * micro_batch * config.n_head * seq_len * seq_len + 4 * params)
    return float(flops), float(memory)


def heavy_cpu_warning(config, global_batch: int, micro_batch: int, seq_len: int, max_steps: int,
                      gflops: float, max_step_s: float = 60.0, max_memory_gb: float = 8.0) -> Optional[str]:
    """A warning when a CPU run is far too big to try casually (a step over `max_step_s` seconds at `gflops`,
    or over `max_memory_gb` of training memory), with the flags that shrink it; None when it is reasonable."""
    flops, memory = step_cost(config, global_batch, micro_batch, seq_len)
    step_s = flops / (gflops * 1e9)
    if step_s <= max_step_s and memory / 1e9 <= max_memory_gb:
        return None
    total_h = step_s * max_steps / 3600
    return (f"Warning: this is a heavy run for a CPU: one step of {global_batch} x {seq_len} tokens on {config.name} "
            f"is ~{flops / 1e12:.1f} TFLOP (~{_duration(step_s)} at the ~{gflops:.0f} GFLOP/s measured here; "
            f"{max_steps} steps ~{total_h:.1f} h) and micro-batches of {micro_batch} need ~{memory / 1e9:.0f} GB. "
            "For a quick run lower --global_batch_size, --micro_batch_size and --seq_len (e.g. "
            "--global_batch_size 32 --micro_batch_size 8 --seq_len 256), or train on a GPU.")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- schedule and batches


def cosine_lr(step: int, warmup: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup lr * (step + 1) / warmup,
    then cosine decay from lr at step `warmup` to min_lr at `max_steps`, min_lr afterwards."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def warmup_for(max_steps: int, warmup_steps: Optional[int]) -> int:
    """`warmup_steps` (default: SMDM's max(1% of max_steps, 100)), capped at max_steps."""
    return min(max(max_steps // 100, 100) if warmup_steps is None else warmup_steps, max_steps)


def default_micro_batch_size(n_million: float) -> int:
    """Upstream SMDM's per-device batch by model size (non-embedding millions of parameters)."""
    return 32 if n_million <= 20 else 16 if n_million <= 50 else 8 if n_million <= 1000 else 4


def grad_accum_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per device per optimizer step; UserError unless they tile the global batch exactly."""
    per_step = micro_batch_size * world_size
    if global_batch_size < per_step or global_batch_size % per_step:
        raise UserError(f"--global_batch_size {global_batch_size} is not a multiple of micro_batch_size x devices "
                        f"= {micro_batch_size} x {world_size}; change one of --global_batch_size, "
                        "--micro_batch_size or --devices.")
    return global_batch_size // per_step


def micro_batch_rows(micro_idx: int, micro_batch_size: int, rank: int, world_size: int) -> slice:
    """Rows of a step's global batch that micro-batch `micro_idx` of `rank` trains on. Together the
    ranks and micro-batches tile the global batch, whatever the device count."""
    start = (micro_idx * world_size + rank) * micro_batch_size
    return slice(start, start + micro_batch_size)


# ---------------------------------------------------------------- finiteness


def nonfinite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names of the tensors in `obj` (a module's parameters and buffers, an optimizer's state, a tensor, or a
    dict / list of those) that hold NaN or inf. Local shards only under FSDP."""
    bad: list[str] = []
    if isinstance(obj, torch.Tensor):
        if first_nonfinite([(prefix or "tensor", obj)]) is not None:  # fast: a finite sum proves a tensor finite
            bad.append(prefix or "tensor")
    elif isinstance(obj, torch.nn.Module):
        for name, t in list(obj.named_parameters()) + list(obj.named_buffers()):
            bad += nonfinite_tensors(t, f"{prefix}.{name}" if prefix else name)
    elif isinstance(obj, torch.optim.Optimizer) or hasattr(obj, "optimizer") and hasattr(obj, "state_dict") \
            and not isinstance(obj, torch.nn.Module):
        state = getattr(obj, "state", {})
        for i, s in enumerate(state.values()):
            bad += nonfinite_tensors(s, f"{prefix}[{i}]")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            bad += nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += nonfinite_tensors(v, f"{prefix}[{i}]")
    return bad


def require_finite(obj: Any, what: str, fix: str) -> None:
    """ValueError (nothing is written) when `obj` holds a NaN or inf tensor."""
    bad = nonfinite_tensors(obj)
    if bad:
        raise TrainingDiverged(f"{what} holds NaN/inf values ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
                               f"; it was not written. {fix}")


# ---------------------------------------------------------------- checkpoints


def checkpoint_name(iter_num: int) -> str:
    """SMDM's checkpoint file name, `iter-XXXXXX-ckpt.pth` (micro-batch iterations)."""
    return f"iter-{iter_num:06d}-ckpt.pth"


def latest_checkpoint(out_dir: Union[str, Path]) -> Optional[Path]:
    """The `iter-XXXXXX-ckpt.pth` in `out_dir` with the highest iteration, or None.
    Temporary files of an interrupted save are never returned."""
    out_dir = Path(out_dir)
    found = [(int(m.group(1)), p) for p in out_dir.glob("iter-*-ckpt.pth")
             if (m := CKPT_PATTERN.match(p.name)) and p.is_file()] if out_dir.is_dir() else []
    return max(found)[1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(fabric: Fabric, path: Union[str, Path], state: dict[str, Any]) -> Path:
    """Save `state` (modules, optimizers and plain values) plus torch's RNG state (rank 0's) to `path`,
    atomically.

    The file is written as `<path>.<pid>-<random>.tmp` (unique per process) in the same folder, flushed to disk,
    then renamed over `path` (os.replace). If writing fails or the process dies part-way, `path` and every
    earlier checkpoint are untouched, and the partial file is never picked up by `latest_checkpoint`.
    Collective: call on every rank.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp = Path(fabric.broadcast(str(tmp)))  # one name on every rank (FSDP ranks write to the same file)
    if fabric.global_rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    try:
        fabric.save(tmp, {**state, "rng_state": _rng_state()})
        if fabric.global_rank == 0:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        if fabric.global_rank == 0:
            tmp.unlink(missing_ok=True)
        raise
    fabric.barrier()
    return path


def load_checkpoint(fabric: Fabric, path: Union[str, Path], state: dict[str, Any]) -> dict[str, Any]:
    """Restore `state` in place from a checkpoint (modules and optimizers strictly, plain values
    replaced) and torch's RNG state when the file holds one; returns the file's other entries.

    Loads with torch's `weights_only` default (no code runs). A truncated or corrupt file, one that does not
    fit the model, or one holding NaN/inf weights or optimizer state raises a ValueError that names the file and
    the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} not found; pass an existing iter-*-ckpt.pth or --resume none.")
    try:
        rest = fabric.load(path, state)
    except KeyError as e:
        raise UserError(f"Checkpoint {path} lacks entry {e} that this trainer needs; it was not written by "
                        "this trainer. Start from its weights instead of resuming.") from None
    except RuntimeError as e:
        if "state_dict" in str(e):
            raise UserError(f"Checkpoint {path} does not fit the model being trained ({e}); resume with the "
                            "same --model_name / --vocab_size, or use another --out_dir.") from None
        raise _corrupt(path, e) from None
    except (EOFError, OSError, pickle.UnpicklingError) as e:
        raise _corrupt(path, e) from None
    bad = nonfinite_tensors({k: v for k, v in state.items() if isinstance(v, torch.nn.Module) or hasattr(v, "state")})
    if bad:
        raise UserError(f"Checkpoint {path} holds NaN/inf values ({', '.join(bad[:3])}); delete it to resume from the "
                        "previous checkpoint in the same folder, or start fresh with --resume none.")
    if "rng_state" in rest:
        _set_rng_state(rest.pop("rng_state"))
    return rest


def _corrupt(path: Path, e: BaseException) -> ValueError:
    return UserError(f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}). Delete it to resume "
                     "from the previous checkpoint in the same folder.")


def resume_path(out_dir: Union[str, Path], resume: str) -> Optional[Path]:
    """Checkpoint to resume from for `--resume` ('auto' = newest in out_dir, 'none', or a path)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    return Path(resume)


def changed_settings(saved: Optional[Mapping], now: Mapping, keys: Optional[Iterable[str]] = None) -> dict:
    """{key: (saved, now)} for the settings that differ (all but NOT_TRAJECTORY, or only `keys`)."""
    if not saved:
        return {}
    names = list(keys) if keys is not None else sorted((set(saved) | set(now)) - NOT_TRAJECTORY)
    return {k: (saved.get(k), now.get(k)) for k in names if saved.get(k) != now.get(k)}


def resume_state(fabric: Fabric, state: dict[str, Any], path: Optional[Path], hparams: Optional[dict] = None,
                 keys: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Restore `state` from checkpoint `path` (None: nothing to do) and print a warning listing every setting
    that differs from the saved run (`changed_settings`): the run then leaves the original trajectory.
    `state["hparams"]` (and fit's loss guard) are taken from the file when it has them, not required."""
    if path is None:
        return state
    optional = {k: state.pop(k) for k in ("hparams", "loss_guard") if k in state}
    rest = load_checkpoint(fabric, path, state)
    saved = rest.get("hparams", rest.get("train_args"))
    if hparams is not None:
        changed = changed_settings(saved, hparams, keys)
        if changed:
            listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
            fabric.print(f"Warning: resuming {path} with changed settings ({listing}); the run leaves the original "
                         "trajectory. Use another --out_dir (or --resume none) to start over instead.")
    state.update(optional)
    if "loss_guard" in rest:
        state["loss_guard"] = rest["loss_guard"]
    fabric.print(f"Resumed from {path} at step {state['step_count']}")
    return state


def build_optimizer(fabric: Fabric, params: Iterable[torch.nn.Parameter], cfg: OptimConfig):
    """AdamW from OptimConfig fields, set up by Fabric."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.beta1, cfg.beta2), foreach=False)
    return fabric.setup_optimizers(optimizer)


def setup_model_and_optimizer(fabric: Fabric, model: torch.nn.Module, cfg: OptimConfig, hparams: dict) -> dict:
    """Set up `model` and AdamW with Fabric; returns the checkpoint state {"model", "optimizer", "hparams",
    "iter_num", "step_count"} of the SMDM trainers (fit restores it when resuming)."""
    model = fabric.setup(model)
    return {"model": model, "optimizer": build_optimizer(fabric, model.parameters(), cfg), "hparams": hparams,
            "iter_num": 0, "step_count": 0}


# ---------------------------------------------------------------- logging


def csv_logger(out_dir: Union[str, Path], name: str = "logs", flush_every: int = 10) -> CSVLogger:
    """Fabric CSVLogger writing `<out_dir>/<name>/version_<k>/metrics.csv` (a new version per run,
    so a resumed run never overwrites the log of the run it continues)."""
    return CSVLogger(root_dir=str(out_dir), name=name, flush_logs_every_n_steps=flush_every)


def progress(fabric: Fabric, total: int, initial: int = 0, desc: str = "train") -> tqdm:
    """tqdm progress bar over optimizer steps, shown on rank 0 only."""
    return tqdm(total=total, initial=initial, desc=desc, disable=fabric.global_rank != 0, dynamic_ncols=True)


def num_parameters(module: torch.nn.Module, trainable: Optional[bool] = None) -> int:
    """Parameter count (all, or only trainable / frozen ones)."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


# ---------------------------------------------------------------- the training loop


@dataclass
class TrainGroup:
    """Modules and optimizer one optimizer update steps, with their own cosine schedule."""
    module: torch.nn.Module  # as returned by fabric.setup / setup_module (gradient sync, clipping)
    optimizer: Any  # as returned by fabric.setup_optimizers
    lr: float  # peak learning rate
    min_lr: float = 0.0  # end of the cosine decay
    name: str = ""  # metric suffix (lr_<name>, grad_norm_<name>); "" logs lr / grad_norm
    flag: str = "--lr"  # the flag that sets `lr`, named when the run diverges


@dataclass
class Schedule:
    max_steps: int
    warmup_steps: int
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0: no clipping (the norm is still measured and guarded)
    save_interval: int = 0  # checkpoint every N steps; 0: only after the last one
    eval_interval: int = 0  # evaluate every N steps; 0: only after the last one (when an evaluate function is given)
    divergence_factor: float = DIVERGENCE_FACTOR  # see RunConfig; 0 disables


@dataclass
class FitResult:
    losses: list[float]  # logged loss of every step this call ran
    metrics: dict = field(default_factory=dict)  # the last step's logged metrics
    evaluation: dict = field(default_factory=dict)  # the last evaluate() result


StepFn = Callable[[int, int], "tuple[torch.Tensor, Mapping[str, Any]]"]


def _stop(fabric: Fabric, out_dir: Path, step: int, problem: str, groups: Sequence[TrainGroup],
          extra_fix: str = "") -> TrainingDiverged:
    last = latest_checkpoint(out_dir)
    kept = f"the newest checkpoint {last} is the last good one" if last else "no checkpoint was written"
    lrs = ", ".join(f"{g.flag} {g.lr:g}" for g in groups)
    for logger in fabric.loggers:
        logger.save()
    return TrainingDiverged(f"training stopped at step {step + 1}: {problem}; this update was not applied and "
                            f"{kept}. Lower the learning rate ({lrs}){extra_fix} and run again.")


def fit(fabric: Fabric, state: dict, step_fn: StepFn,
        groups: Union[Sequence[TrainGroup], Callable[[int], Sequence[TrainGroup]]], schedule: Schedule,
        out_dir: Union[str, Path], evaluate: Optional[Callable[[], Mapping[str, float]]] = None, *,
        resume: Optional[Path] = None, hparams: Optional[dict] = None) -> FitResult:
    """Run optimizer steps state["step_count"] .. schedule.max_steps - 1: the only training loop.

    step_fn(step, micro) -> (loss, metrics): forward of micro-batch `micro` (0 .. grad_accum - 1) of optimizer
        step `step` (0-based); `loss` is what is back-propagated (a scalar tensor), `metrics` maps names to
        scalars (tensors or numbers) logged as their mean over micro-batches and ranks; "loss" in it replaces
        the logged loss (e.g. a total while a part of it is optimized). It must depend only on its arguments
        and the weights, so that a resumed run continues the uninterrupted trajectory exactly.
    groups: the TrainGroups every step updates, or a function step -> groups (e.g. alternating updates). Their
        gradients are cleared at the start of the step, so only this step's micro-batches count; modules of no
        group are not updated (run them under no_grad to save the backward).
    state: what each checkpoint holds: the trained modules and optimizers (under any names), plain values,
        and the counters "step_count" (optimizer steps) and "iter_num" (micro-batches, SMDM's count) that fit
        advances; fit adds "loss_guard".
    evaluate() -> metrics: run every schedule.eval_interval steps and after the last (also when no step is
        left to run), logged and printed.
    resume: a checkpoint to restore `state` from first (`resume_path(out_dir, "auto")`: the newest in out_dir);
        hparams: this run's settings, stored in state["hparams"]; those that differ from the checkpoint's are
        listed in a warning (resume_state).

    Per step: cosine LR per group; accumulate backward(loss / grad_accum) with gradient sync only on the last
    micro-batch; clip each group's gradients (measuring their norm); stop with TrainingDiverged (a UserError:
    one line naming the step and suggesting a lower learning rate) before the update when the loss or a
    gradient norm is NaN/inf, or when the running loss exceeds divergence_factor x its best after warmup;
    optimizer step; log; checkpoint atomically every save_interval steps and after the last (never a
    checkpoint holding NaN/inf: the last good one stays the newest). Holds RunLock(out_dir) throughout.
    """
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        if not _launcher_child():
            stack.enter_context(RunLock(out_dir))
        if hparams is not None:
            state["hparams"] = hparams
        resume_state(fabric, state, resume, hparams)
        return _fit(fabric, state, step_fn, groups, schedule, out_dir, evaluate)


def _fit(fabric, state, step_fn, groups, schedule: Schedule, out_dir: Path, evaluate) -> FitResult:
    groups_of = groups if callable(groups) else (lambda step, _g=list(groups): _g)
    guard = state.setdefault("loss_guard", {"ema": None, "best": None})
    result = FitResult(losses=[])
    bar = progress(fabric, total=schedule.max_steps, initial=state["step_count"])
    try:
        _steps(fabric, state, step_fn, groups_of, schedule, out_dir, evaluate, guard, result, bar)
    finally:
        bar.close()  # before any error message, so that it starts a line of its own
    if evaluate is not None and not result.evaluation:  # nothing left to train: report the held-out figures
        result.evaluation = _evaluate(fabric, evaluate, state["step_count"])
    for logger in fabric.loggers:
        logger.finalize("success")
    return result


def _steps(fabric, state, step_fn, groups_of, schedule: Schedule, out_dir: Path, evaluate, guard: dict,
           result: FitResult, bar) -> None:
    for step in range(state["step_count"], schedule.max_steps):
        trained = list(groups_of(step))
        lrs = {}
        for g in trained:
            g.optimizer.zero_grad(set_to_none=True)  # what another step's backward left here does not count
            lr = cosine_lr(step, schedule.warmup_steps, schedule.max_steps, g.lr, g.min_lr)
            for pg in g.optimizer.param_groups:  # a param group may run at a fixed ratio of the group's lr
                pg["lr"] = lr * pg.get("lr_scale", 1.0)
            lrs[f"lr_{g.name}" if g.name else "lr"] = lr
        sums: Optional[torch.Tensor] = None
        names: list[str] = []
        for micro in range(schedule.grad_accum):
            last_micro = micro == schedule.grad_accum - 1
            with contextlib.ExitStack() as sync:
                for g in trained:
                    sync.enter_context(fabric.no_backward_sync(g.module, enabled=not last_micro))
                loss, metrics = step_fn(step, micro)
                fabric.backward(loss / schedule.grad_accum)
            if sums is None:
                names = ["_objective", *metrics]
            values = [loss.detach(), *(metrics[k] for k in names[1:])]
            row = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=fabric.device).detach().reshape(())
                               for v in values])
            sums = row if sums is None else sums + row
        means = fabric.all_reduce(sums / schedule.grad_accum, reduce_op="mean").tolist()
        logged = dict(zip(names, means))
        objective = logged.pop("_objective")
        step_loss = logged.pop("loss", objective)
        norms = {}
        for g in trained:
            clip = schedule.grad_clip if schedule.grad_clip > 0 else float("inf")
            norm = fabric.clip_gradients(g.module, g.optimizer, max_norm=clip, error_if_nonfinite=False)
            norms[f"grad_norm_{g.name}" if g.name else "grad_norm"] = float(norm)
        bad = [f"the loss is {v}" for v in (objective, step_loss) if not math.isfinite(v)][:1]
        bad += [f"the gradient norm ({k}) is {v}" for k, v in norms.items() if not math.isfinite(v)]
        if bad:
            for g in trained:
                g.optimizer.zero_grad(set_to_none=True)
            raise _stop(fabric, out_dir, step, bad[0], trained)
        if schedule.divergence_factor > 0:
            guard["ema"] = step_loss if guard["ema"] is None else (1 - LOSS_EMA) * guard["ema"] + LOSS_EMA * step_loss
            if step >= schedule.warmup_steps:
                if guard["best"] is not None and guard["ema"] > schedule.divergence_factor * guard["best"]:
                    for g in trained:
                        g.optimizer.zero_grad(set_to_none=True)
                    raise _stop(fabric, out_dir, step,
                                f"the running loss {guard['ema']:.4g} grew beyond --divergence_factor "
                                f"{schedule.divergence_factor:g} x its best {guard['best']:.4g}", trained,
                                " or raise --divergence_factor (0 disables the check)")
                guard["best"] = guard["ema"] if guard["best"] is None else min(guard["best"], guard["ema"])
        for g in trained:
            g.optimizer.step()
            g.optimizer.zero_grad(set_to_none=True)
        state["step_count"] += 1
        state["iter_num"] += schedule.grad_accum
        result.losses.append(step_loss)
        metrics = {"loss": step_loss, **logged, **lrs, **norms, "iter_num": state["iter_num"]}
        done = state["step_count"] == schedule.max_steps
        eval_due = schedule.eval_interval and state["step_count"] % schedule.eval_interval == 0
        if evaluate is not None and (done or eval_due):
            result.evaluation = _evaluate(fabric, evaluate, state["step_count"], bar)
            metrics.update(result.evaluation)
        fabric.log_dict(metrics, step=state["step_count"])
        result.metrics = metrics
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", **{k: f"{v:.2e}" for k, v in lrs.items()})
        if done or (schedule.save_interval and state["step_count"] % schedule.save_interval == 0):
            for logger in fabric.loggers:  # the metrics log is on disk up to every checkpoint
                logger.save()
            _check_state_finite(fabric, state, out_dir, step, trained)
            save_checkpoint(fabric, out_dir / checkpoint_name(state["iter_num"]), state)


def _evaluate(fabric: Fabric, evaluate, step: int, bar: Optional[tqdm] = None) -> dict:
    figures = dict(evaluate())
    line = f"step {step}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in figures.items())
    if fabric.global_rank == 0:
        (bar.write if bar is not None else print)(line)  # on a line of its own, not inside the progress bar
    return figures


def _check_state_finite(fabric: Fabric, state: dict, out_dir: Path, step: int, groups) -> None:
    """Every rank checks its tensors; all stop together when any holds NaN/inf (nothing is written)."""
    bad = nonfinite_tensors({k: v for k, v in state.items() if k not in ("hparams", "loss_guard")})
    flag = fabric.all_reduce(torch.tensor(float(len(bad)), device=fabric.device), reduce_op="sum")
    if float(flag) > 0:
        raise _stop(fabric, out_dir, step, f"the weights hold NaN/inf after the update "
                                           f"({', '.join(bad[:3]) or 'on another rank'}) and were not saved",
                    groups)


def export_smdm(fabric: Fabric, out_dir: Path, config, export_dir: Path, tokenizer=None) -> Optional[Path]:
    """On rank 0, write the model weights of the newest checkpoint in `out_dir` as an SMDM folder
    (model.safetensors + smdm_config.json, see lit_gpt.model.save_smdm_folder) with `tokenizer` (a
    transformers tokenizer, saved beside them so that the folder loads on its own); the same after DDP
    or FSDP. Returns `export_dir`, or None when `out_dir` holds no checkpoint. Refuses (writes nothing)
    when the weights hold NaN/inf."""
    from lit_gpt.model import build_model, load_weights, save_smdm_folder

    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        return None
    if fabric.global_rank == 0:
        with torch.device("meta"):
            model = build_model(config)  # a TransEncoder, or the dual-stream RemeDi when config.ups_positions is set
        model = model.to_empty(device="cpu")
        load_weights(model, checkpoint)
        require_finite(model, f"the model of {checkpoint}", "Train again with a lower learning rate.")
        save_smdm_folder(model, export_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(export_dir))
        fabric.print(f"Exported {checkpoint.name} to {export_dir}" + (" with its tokenizer" if tokenizer is not None
                                                                       else " (no tokenizer: pass --tokenizer to "
                                                                       "ship one)"))
    fabric.barrier()
    return export_dir
