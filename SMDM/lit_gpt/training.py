"""Trainer utilities shared by train_mdm.py, sft/train_sft.py and train_remedi.py.

Fabric wiring (devices, strategy, precision), the cosine learning-rate schedule, atomic
checkpoints with resume from the newest, a CSV metrics logger, a rank-0 progress bar, and the
optimizer-step loop (`fit`) that train_mdm.py and train_sft.py share.
"""
import argparse
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from lightning_fabric import Fabric
from lightning_fabric.loggers import CSVLogger
from lightning_fabric.strategies import DDPStrategy, FSDPStrategy
from tqdm.auto import tqdm

CKPT_PATTERN = re.compile(r"^iter-(\d+)-ckpt\.pth$")
STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


# ---------------------------------------------------------------- command line


def add_fabric_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --accelerator --devices --num_nodes --strategy --precision to `parser`."""
    g = parser.add_argument_group("fabric")
    g.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda", "gpu", "mps"),
                   help="hardware to run on")
    g.add_argument("--devices", type=int, default=1, help="devices (processes) per node")
    g.add_argument("--num_nodes", type=int, default=1, help="number of nodes")
    g.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="auto: single device, or DDP when devices * num_nodes > 1; "
                        "fsdp: full sharding, one unit per transformer block")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="default: bf16-mixed on a GPU that supports bf16, else 32-true")
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--model N / --model_name NAME / --vocab_size, read by `config_from_args`."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=int, default=None, help="upstream size in millions: 170 -> Diff_LLaMA_170M")
    g.add_argument("--model_name", default=None, help="config name, e.g. Diff_LLaMA_170M or Diff_LLaMA_tiny")
    g.add_argument("--vocab_size", type=int, default=None,
                   help="override the config's vocabulary (tokenizer size; the mask id is this value)")
    return parser


def config_from_args(args: argparse.Namespace):
    """SMDM Config named by exactly one of --model / --model_name, with --vocab_size applied."""
    from lit_gpt.config import Config

    if (args.model is None) == (args.model_name is None):
        raise ValueError("Pass exactly one of --model N (upstream size, e.g. 170) or --model_name NAME "
                         "(e.g. Diff_LLaMA_tiny).")
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    return Config.from_name(args.model_name or f"Diff_LLaMA_{args.model}M", **overrides)


def add_optim_args(parser: argparse.ArgumentParser, lr: float, min_lr: float,
                   warmup_steps: Optional[int] = None) -> argparse.ArgumentParser:
    """AdamW + cosine schedule flags with SMDM's defaults (wd 0.1, betas (0.9, 0.95), clip 1.0)."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=min_lr, help="final learning rate of the cosine decay")
    g.add_argument("--warmup_steps", type=int, default=warmup_steps,
                   help="linear warmup steps, capped at max_steps; None: max(1%% of max_steps, 100)")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip (0 disables)")
    g.add_argument("--micro_batch_size", type=int, default=None,
                   help="sequences per device per forward; default by model size as upstream (32/16/8/4)")
    g.add_argument("--global_batch_size", type=int, default=256,
                   help="sequences per optimizer step over all devices (gradient accumulation fills the gap)")
    return parser


def add_run_args(parser: argparse.ArgumentParser, out_dir: str) -> argparse.ArgumentParser:
    """Output, checkpoint and reproducibility flags."""
    g = parser.add_argument_group("run")
    g.add_argument("--out_dir", type=Path, default=Path(out_dir),
                   help="checkpoints iter-XXXXXX-ckpt.pth, logs/version_k/metrics.csv and the final export")
    g.add_argument("--save_interval", type=int, default=5000, help="save a checkpoint every N optimizer steps "
                                                                   "(and always after the last one)")
    g.add_argument("--resume", default="auto",
                   help="'auto': continue from the newest checkpoint in --out_dir if any; 'none': start fresh; "
                        "or a checkpoint path")
    g.add_argument("--seed", type=int, default=3407, help="seeds model init, data order and noise")
    g.add_argument("--export_dir", type=Path, default=None,
                   help="folder for the final model.safetensors + smdm_config.json; default <out_dir>/final")
    return parser


# ---------------------------------------------------------------- fabric


def default_precision(accelerator: str) -> str:
    on_gpu = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def make_strategy(strategy: str, devices: int, num_nodes: int, cpu: bool,
                  wrap_blocks: Optional[set[type]] = None) -> Union[str, DDPStrategy, FSDPStrategy]:
    """Fabric strategy for the --strategy flag.

    ddp (also chosen by "auto" when devices * num_nodes > 1): NCCL on GPUs, gloo on CPU.
    fsdp (GPU only): full sharding with each module of a class in `wrap_blocks` (default SMDM's
    `Block`) as one unit, and full (unsharded) state dicts, so a checkpoint is one file whatever
    the strategy.
    """
    if strategy == "fsdp":
        if cpu:
            raise ValueError("--strategy fsdp needs GPUs (Fabric has no FSDP on CPU); use --strategy ddp on CPU.")
        if wrap_blocks is None:
            from lit_gpt.model import Block
            wrap_blocks = {Block}
        return FSDPStrategy(auto_wrap_policy=wrap_blocks, state_dict_type="full", limit_all_gathers=True,
                            cpu_offload=False)
    if strategy == "ddp" or devices * num_nodes > 1:
        return DDPStrategy(process_group_backend="gloo" if cpu else None)
    return "auto"


def setup_fabric(args: argparse.Namespace, wrap_blocks: Optional[set[type]] = None,
                 loggers: Optional[list] = None) -> Fabric:
    """Create and launch a Fabric from `add_fabric_args` flags (see `make_strategy`); returns it
    ready on every rank. With devices > 1 Fabric re-launches the running script once per extra
    device, so call this from a script's main, not from inside another program.
    """
    precision = args.precision or default_precision(args.accelerator)
    cpu = args.accelerator == "cpu" or (args.accelerator == "auto" and not torch.cuda.is_available())
    strategy = make_strategy(args.strategy, args.devices, args.num_nodes, cpu, wrap_blocks)
    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                    strategy=strategy, precision=precision, loggers=loggers)
    fabric.launch()
    return fabric


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
    """Micro-batches per device per optimizer step; ValueError unless they tile the global batch exactly."""
    per_step = micro_batch_size * world_size
    if global_batch_size < per_step or global_batch_size % per_step:
        raise ValueError(f"--global_batch_size {global_batch_size} is not a multiple of micro_batch_size x devices "
                         f"= {micro_batch_size} x {world_size}; change one of --global_batch_size, "
                         "--micro_batch_size or --devices.")
    return global_batch_size // per_step


def micro_batch_rows(micro_idx: int, micro_batch_size: int, rank: int, world_size: int) -> slice:
    """Rows of a step's global batch that micro-batch `micro_idx` of `rank` trains on. Together the
    ranks and micro-batches tile the global batch, whatever the device count."""
    start = (micro_idx * world_size + rank) * micro_batch_size
    return slice(start, start + micro_batch_size)


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
    """Save `state` (model, optimizer and plain values) plus torch's RNG state (rank 0's) to `path`,
    atomically.

    The file is written as `<path>.tmp` in the same folder, flushed to disk, then renamed over
    `path` (os.replace). If writing fails or the process dies part-way, `path` and every earlier
    checkpoint are untouched, and the partial `.tmp` is not picked up by `latest_checkpoint`.
    Collective: call on every rank.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
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

    Loads with torch's `weights_only` default (no code runs). A truncated or corrupt file, or one
    that does not fit the model, raises a ValueError that names the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} not found; pass an existing iter-*-ckpt.pth or --resume none.")
    try:
        rest = fabric.load(path, state)
    except KeyError as e:
        raise ValueError(f"Checkpoint {path} lacks entry {e} that this trainer needs; it was not written by "
                         "this trainer. Start from its weights instead of resuming.") from None
    except RuntimeError as e:
        if "state_dict" in str(e):
            raise ValueError(f"Checkpoint {path} does not fit the model being trained ({e}); resume with the "
                             "same --model_name / --vocab_size, or use another --out_dir.") from None
        raise _corrupt(path, e) from None
    except (EOFError, OSError, pickle.UnpicklingError) as e:
        raise _corrupt(path, e) from None
    if "rng_state" in rest:
        _set_rng_state(rest.pop("rng_state"))
    return rest


def _corrupt(path: Path, e: BaseException) -> ValueError:
    return ValueError(f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}). Delete it to resume "
                      "from the previous checkpoint in the same folder.")


def resume_path(out_dir: Path, resume: str) -> Optional[Path]:
    """Checkpoint to resume from for `--resume` ('auto' = newest in out_dir, 'none', or a path)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    return Path(resume)


def hparams_of(args: argparse.Namespace) -> dict:
    """The CLI flags as plain values (paths as strings) for checkpoints and logs."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if v is None or isinstance(v, (bool, int, float, str, Path))}


def build_optimizer(fabric: Fabric, params: Iterable[torch.nn.Parameter], args: argparse.Namespace):
    """AdamW from `add_optim_args` flags, set up by Fabric."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(args.beta1, args.beta2), foreach=False)
    return fabric.setup_optimizers(optimizer)


def init_state(fabric: Fabric, model: torch.nn.Module, args: argparse.Namespace, hparams: dict,
               trajectory_keys: Iterable[str] = ()) -> dict:
    """Set up `model` and AdamW with Fabric and return the checkpoint state {"model", "optimizer",
    "hparams", "iter_num", "step_count"}, restored from the checkpoint `--resume` selects (if any).
    Resuming with a different value of a `trajectory_keys` hparam prints a warning, since the run
    then leaves the original trajectory."""
    model = fabric.setup(model)
    state = {"model": model, "optimizer": build_optimizer(fabric, model.parameters(), args), "hparams": hparams,
             "iter_num": 0, "step_count": 0}
    resume = resume_path(args.out_dir, args.resume)
    if resume is not None:
        load_checkpoint(fabric, resume, state)  # state["hparams"] is now the checkpoint's
        changed = {k: (state["hparams"].get(k), hparams.get(k)) for k in trajectory_keys
                   if state["hparams"].get(k) != hparams.get(k)}
        if changed:
            fabric.print(f"Warning: resuming with changed settings {changed} (saved, now): the trajectory differs "
                         "from the original run.")
        state["hparams"] = hparams
        fabric.print(f"Resumed from {resume} at step {state['step_count']}")
    return state


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


# ---------------------------------------------------------------- training loop and export


@dataclass
class Schedule:
    max_steps: int
    warmup_steps: int
    lr: float
    min_lr: float
    grad_accum: int
    grad_clip: float
    save_interval: int
    eval_interval: int = 0  # 0: evaluate only after the last step (when an evaluate function is given)


def fit(fabric: Fabric, state: dict, micro_loss: Callable[[int, int], torch.Tensor], schedule: Schedule,
        out_dir: Path, evaluate: Optional[Callable[[], float]] = None) -> list[float]:
    """Run optimizer steps state["step_count"] .. schedule.max_steps - 1.

    Per step: set the cosine LR, accumulate `micro_loss(step, micro_idx) / grad_accum` over
    `grad_accum` micro-batches (gradient sync only on the last), clip, AdamW step. `state` holds
    "model", "optimizer", "iter_num" (micro-batches, SMDM's count) and "step_count". Logs loss
    (mean over micro-batches and ranks), lr and, every `eval_interval` steps and after the last,
    `evaluate()` as val_loss; checkpoints atomically every `save_interval` steps and after the
    last, flushing the metrics log first. `micro_loss` must depend on its arguments and the
    weights only, so that a resumed run continues the uninterrupted trajectory exactly.
    Returns this run's step losses.
    """
    model, optimizer = state["model"], state["optimizer"]
    losses: list[float] = []
    bar = progress(fabric, total=schedule.max_steps, initial=state["step_count"])
    for step in range(state["step_count"], schedule.max_steps):
        lr = cosine_lr(step, schedule.warmup_steps, schedule.max_steps, schedule.lr, schedule.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_losses = []
        for micro in range(schedule.grad_accum):
            with fabric.no_backward_sync(model, enabled=micro < schedule.grad_accum - 1):
                loss = micro_loss(step, micro)
                fabric.backward(loss / schedule.grad_accum)
            micro_losses.append(loss.detach())
        if schedule.grad_clip > 0:
            fabric.clip_gradients(model, optimizer, max_norm=schedule.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step_count"] += 1
        state["iter_num"] += schedule.grad_accum
        step_loss = fabric.all_reduce(torch.stack(micro_losses).mean(), reduce_op="mean").item()
        losses.append(step_loss)
        metrics = {"loss": step_loss, "lr": lr, "iter_num": state["iter_num"]}
        last = state["step_count"] == schedule.max_steps
        eval_due = schedule.eval_interval and state["step_count"] % schedule.eval_interval == 0
        if evaluate is not None and (last or eval_due):
            metrics["val_loss"] = evaluate()
            fabric.print(f"step {state['step_count']}: val loss {metrics['val_loss']:.4f}")
        fabric.log_dict(metrics, step=state["step_count"])
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if last or state["step_count"] % schedule.save_interval == 0:
            for logger in fabric.loggers:  # the metrics log is on disk up to every checkpoint
                logger.save()
            save_checkpoint(fabric, out_dir / checkpoint_name(state["iter_num"]), state)
    bar.close()
    for logger in fabric.loggers:
        logger.finalize("success")
    return losses


def export_smdm(fabric: Fabric, out_dir: Path, config, export_dir: Path) -> Optional[Path]:
    """On rank 0, write the model weights of the newest checkpoint in `out_dir` as an SMDM folder
    (model.safetensors + smdm_config.json, see lit_gpt.model.save_smdm_folder); the same after DDP
    or FSDP. Returns `export_dir`, or None when `out_dir` holds no checkpoint."""
    from lit_gpt.model import TransEncoder, load_weights, save_smdm_folder

    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        return None
    if fabric.global_rank == 0:
        with torch.device("meta"):
            model = TransEncoder(config)
        model = model.to_empty(device="cpu")
        load_weights(model, checkpoint)
        save_smdm_folder(model, export_dir)
        fabric.print(f"Exported {checkpoint.name} to {export_dir}")
    fabric.barrier()
    return export_dir
