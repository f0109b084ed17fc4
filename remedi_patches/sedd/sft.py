"""Supervised fine-tuning of a SEDD (score-entropy discrete diffusion) model: the trainer behind SMDM/sedd/sft.py.

    from remedi_patches.sedd.sft import compose_config, train
    cfg = compose_config(["sft.pretrained_model=/models/sedd-small", "sft.dataset=data/train.jsonl"])
    result = train(cfg, overrides)      # or main(overrides): compose + train, as the command line does

Configuration: SMDM/sedd/configs/sft.yaml (the guide's keys: sft.*, optim.*, training.*, ngpus, load_dir, out_dir).

What one optimizer step does. Rows are [prompt][response][EOS ... EOS] of sft.max_length tokens (the model's length
by default; the project's data code `remedi_patches.data.build_sft_examples`, so field detection, templates, the
thinking/attempt layout and the missing-field error are the SFT trainers' own); the EOS padding counts as response.
Loss: `remedi_patches.sedd.losses.score_entropy_loss` with prompt_mask = the prompt positions, which are never
perturbed and never scored (t ~ U(eps, 1) per row, sum over positions of dsigma * score entropy, mean over rows).
training.batch_size is the global batch per optimizer step, split into training.accum micro-batches per device
(ngpus Fabric devices). AdamW (betas (0.9, 0.999), eps 1e-8, weight decay 0: upstream SEDD's), linear warmup over
optim.warmup steps then constant (optim.min_lr null; a lower min_lr gives the project's cosine decay), gradient
clip 1.0. EMA of the weights (decay min(training.ema, (1 + n) / (10 + n)), upstream's rule) is updated after each
optimizer step and kept in every checkpoint as {decay, num_updates, shadow_params}.

The loop is the project's `lit_gpt.training.fit`: checkpoints out_dir/iter-XXXXXX-ckpt.pth every
training.snapshot_freq steps and after the last, logs out_dir/logs/version_k/metrics.csv, the validation loss (held
out: sft.val_fraction of the examples, fixed noise, raw weights) every training.eval_freq steps. The samples and the
noise of each micro-batch come from generators seeded by (training.seed, step, rows), so `load_dir=<out_dir>`
continues the uninterrupted trajectory exactly; the resumed run composes the saved run's overrides
(out_dir/sft_overrides.yaml) with the new ones. At the end out_dir/model holds the EMA weights in the SEDD hub
layout (`save_sedd`, with the tokenizer), loadable by `load_sedd` / `load_backbone`.

sft.freeze_embeddings freezes `vocab_embed.embedding` only: SEDD's input embedding is a raw Parameter untied from
the output layer, and the output layer (`output_layer.linear`) is the score head the fine-tuning has to move.

Bad input (unknown key, missing field / model / dataset, bad numbers) raises a UserError / ValueError /
FileNotFoundError with a one-line message; `remedi_patches.cli.run_main` prints it as `error: ...` (exit 2).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

CONFIG_DIR = Path(__file__).resolve().parents[2] / "SMDM" / "sedd" / "configs"
CONFIG_NAME = "sft"
OVERRIDES_FILE = "sft_overrides.yaml"
CONFIG_FILE = "sft_config.yaml"
EXPORT_DIR = "model"
STREAM_TRAIN, STREAM_VAL = 0, 1
DEFAULT_TEXT_FIELD = "text"  # the guide's default; it means auto-detection (which falls back to a `text` column)
# the data code names argparse flags; this trainer's keys are the guide's
FLAG_NAMES = {"--prompt_field": "sft.question_field", "--answer_field": "sft.response_field",
              "--thinking_field": "sft.thinking_field", "--attempt_field": "sft.attempt_field",
              "--text_field": "sft.text_field", "--prompt_template": "sft.prompt_template",
              "--dataset": "sft.dataset", "--split": "sft.split", "--seq_len": "sft.max_length"}


def _user_error(message: str):
    from remedi_patches.cli import UserError

    for flag, key in FLAG_NAMES.items():
        message = message.replace(flag, key)
    return UserError(message.replace("\n", " "))


# ---------------------------------------------------------------- configuration


def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside @hydra.main (or a multirun job): its search path
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


def _load_dir_of(overrides: Sequence[str]) -> Optional[str]:
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "load_dir" and "=" in o]
    return values[-1] if values and values[-1] not in ("null", "") else None


def run_dir(load_dir: str) -> Path:
    """The run folder `load_dir` names (a folder, or a checkpoint file inside one)."""
    path = Path(load_dir).expanduser()
    return path.parent if path.is_file() else path


def compose_config(overrides: Sequence[str] = ()):
    """The run's DictConfig: sft.yaml with `overrides` (Hydra syntax); with load_dir, the saved run's overrides
    come first and these win. One-line UserError for an unknown key or a bad override."""
    overrides = [str(o) for o in overrides]
    load_dir = _load_dir_of(overrides)
    if load_dir is not None:
        folder = run_dir(load_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"load_dir={load_dir}: no such run folder; pass the out_dir of an earlier run "
                                    "(or a checkpoint file in it)")
        saved = folder / OVERRIDES_FILE
        if saved.is_file():
            from omegaconf import OmegaConf

            overrides = [str(o) for o in OmegaConf.load(saved)] + overrides
    try:
        cfg = _compose(overrides)
    except Exception as err:  # noqa: BLE001  hydra / omegaconf errors have many types
        if isinstance(err, (ImportError, MemoryError)):
            raise
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise _user_error(f"bad override ({'; '.join(lines) or type(err).__name__}); the keys are those of "
                          f"{CONFIG_DIR / (CONFIG_NAME + '.yaml')}") from None
    return cfg


@dataclass
class SFTSettings:
    """The checked, typed settings of one run (from the DictConfig)."""
    pretrained_model: str
    tokenizer: Optional[str]
    freeze_embeddings: bool
    dataset: str
    split: str
    subset: Optional[str]
    limit: Optional[int]
    text_field: Optional[str]
    question_field: Optional[str]
    response_field: Optional[str]
    thinking_field: Optional[str]
    attempt_field: Optional[str]
    prompt_template: Optional[str]
    max_length: Optional[int]
    val_fraction: float
    eps: float
    lr: float
    min_lr: float
    warmup: int
    weight_decay: float
    beta1: float
    beta2: float
    adam_eps: float
    grad_clip: float
    n_iters: int
    batch_size: int
    accum: int
    ema: float
    eval_freq: int
    snapshot_freq: int
    seed: int
    accelerator: str
    precision: Optional[str]
    ngpus: int
    out_dir: Path
    resume: Optional[Path]  # the checkpoint to continue from (load_dir), None: a fresh run
    hparams: dict = field(default_factory=dict)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.accum * self.ngpus)


def _get(cfg, key: str, kind, allow_none: bool = False):
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value is None:
        if allow_none:
            return None
        raise _user_error(f"{key} must be set (got null)")
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise _user_error(f"{key}={value!r} is not a valid {kind.__name__}") from None


def settings(cfg) -> SFTSettings:
    """Typed, checked settings (nothing is loaded); UserError naming the first bad key."""
    from omegaconf import OmegaConf

    s = SFTSettings(
        pretrained_model=_get(cfg, "sft.pretrained_model", str), tokenizer=_get(cfg, "sft.tokenizer", str, True),
        freeze_embeddings=_get(cfg, "sft.freeze_embeddings", bool), dataset=_get(cfg, "sft.dataset", str),
        split=_get(cfg, "sft.split", str), subset=_get(cfg, "sft.subset", str, True),
        limit=_get(cfg, "sft.limit", int, True), text_field=_get(cfg, "sft.text_field", str, True),
        question_field=_get(cfg, "sft.question_field", str, True),
        response_field=_get(cfg, "sft.response_field", str, True),
        thinking_field=_get(cfg, "sft.thinking_field", str, True),
        attempt_field=_get(cfg, "sft.attempt_field", str, True),
        prompt_template=_get(cfg, "sft.prompt_template", str, True),
        max_length=_get(cfg, "sft.max_length", int, True), val_fraction=_get(cfg, "sft.val_fraction", float),
        eps=_get(cfg, "sft.eps", float), lr=_get(cfg, "optim.lr", float),
        min_lr=_get(cfg, "optim.min_lr", float, True), warmup=_get(cfg, "optim.warmup", int),
        weight_decay=_get(cfg, "optim.weight_decay", float), beta1=_get(cfg, "optim.beta1", float),
        beta2=_get(cfg, "optim.beta2", float), adam_eps=_get(cfg, "optim.eps", float),
        grad_clip=_get(cfg, "optim.grad_clip", float), n_iters=_get(cfg, "training.n_iters", int),
        batch_size=_get(cfg, "training.batch_size", int), accum=_get(cfg, "training.accum", int),
        ema=_get(cfg, "training.ema", float), eval_freq=_get(cfg, "training.eval_freq", int),
        snapshot_freq=_get(cfg, "training.snapshot_freq", int), seed=_get(cfg, "training.seed", int),
        accelerator=_get(cfg, "training.accelerator", str), precision=_get(cfg, "training.precision", str, True),
        ngpus=_get(cfg, "ngpus", int), out_dir=Path(_get(cfg, "out_dir", str)), resume=None)
    if s.min_lr is None:
        s.min_lr = s.lr
    load_dir = _get(cfg, "load_dir", str, True)
    if load_dir is not None:
        from lit_gpt.training import latest_checkpoint

        path = Path(load_dir).expanduser()
        s.out_dir = run_dir(load_dir)
        s.resume = path if path.is_file() else latest_checkpoint(path)
        if s.resume is None:
            raise _user_error(f"load_dir={load_dir} holds no iter-*-ckpt.pth checkpoint to resume from")
    _check(s)
    container = OmegaConf.to_container(cfg, resolve=True)
    s.hparams = {f"{group}.{k}": v for group in ("sft", "optim", "training") for k, v in container[group].items()}
    s.hparams.update(ngpus=s.ngpus)
    return s


def _check(s: SFTSettings) -> None:
    from lit_gpt.training import ACCELERATORS, PRECISIONS

    for key, value in (("training.n_iters", s.n_iters), ("training.batch_size", s.batch_size),
                       ("training.accum", s.accum), ("ngpus", s.ngpus), ("training.eval_freq", s.eval_freq),
                       ("training.snapshot_freq", s.snapshot_freq)):
        if value < 1:
            raise _user_error(f"{key} must be >= 1, got {value}")
    if s.batch_size % (s.accum * s.ngpus):
        raise _user_error(f"training.batch_size {s.batch_size} must be a multiple of training.accum x ngpus = "
                          f"{s.accum} x {s.ngpus}")
    if not (s.lr > 0 and 0 <= s.min_lr <= s.lr):
        raise _user_error(f"optim.lr must be > 0 and optim.min_lr in [0, lr], got {s.lr}, {s.min_lr}")
    if s.warmup < 0 or s.weight_decay < 0 or s.grad_clip < 0 or not s.adam_eps > 0:
        raise _user_error("optim.warmup, optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0")
    if not (0 <= s.beta1 < 1 and 0 <= s.beta2 < 1):
        raise _user_error(f"optim.beta1 / optim.beta2 must be in [0, 1), got {s.beta1}, {s.beta2}")
    if not 0 <= s.ema < 1:
        raise _user_error(f"training.ema must be in [0, 1), got {s.ema}")
    if not 0 <= s.val_fraction < 1:
        raise _user_error(f"sft.val_fraction must be in [0, 1), got {s.val_fraction}")
    if not 0 <= s.eps < 1:
        raise _user_error(f"sft.eps must be in [0, 1), got {s.eps}")
    if s.max_length is not None and s.max_length < 2 or s.limit is not None and s.limit < 1:
        raise _user_error("sft.max_length must be >= 2 and sft.limit >= 1 when given")
    if s.prompt_template is not None and "{question}" not in s.prompt_template:
        raise _user_error(f"sft.prompt_template {s.prompt_template!r} has no {{question}} placeholder; add one")
    if s.accelerator not in ACCELERATORS or s.precision is not None and s.precision not in PRECISIONS:
        raise _user_error(f"training.accelerator must be one of {ACCELERATORS} and training.precision null or one "
                          f"of {PRECISIONS}")


def resolve_sft_fields(columns: Sequence[str], s: SFTSettings):
    """The guide's field modes on the project's resolver: question/response/thinking/attempt fields when given;
    else a text_field other than the default 'text' = whole-text training; else auto-detection (question+answer,
    question+solution, ..., chat, then a `text` column)."""
    from remedi_patches.data import resolve_fields

    explicit = any(f is not None for f in (s.question_field, s.response_field, s.thinking_field, s.attempt_field))
    text = s.text_field if not explicit and s.text_field not in (None, DEFAULT_TEXT_FIELD) else None
    try:
        return resolve_fields(columns, text, s.question_field, s.response_field, s.thinking_field, s.attempt_field)
    except ValueError as err:
        raise _user_error(str(err)) from None


# ---------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of parameters (fabric checkpoints it through state_dict / load_state_dict)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow_params"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("the checkpoint's EMA does not fit the model being trained")
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        with torch.no_grad():
            for s, v in zip(self.shadow, shadow):
                s.copy_(v)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.dtype))


def attach_ema(optimizer, ema: EMA):
    """Make optimizer.step() also update `ema` (only real updates reach step: fit skips it on a bad step)."""
    inner = optimizer.step

    def step(*args, **kwargs):
        out = inner(*args, **kwargs)
        ema.update()
        return out

    optimizer.step = step
    return optimizer


# ---------------------------------------------------------------- data and loss


@dataclass
class SFTData:
    train: Any  # remedi_patches.data.SFTExamples
    val: Optional[Any]
    tokenizer: Any


def load_data(s: SFTSettings, tokenizer, max_length: int) -> SFTData:
    """Records -> fields -> rows of max_length tokens; the last sft.val_fraction of a seeded shuffle is held out."""
    from remedi_patches.data import build_sft_examples, column_names, load_records

    try:
        records = load_records(s.dataset, s.split, s.subset, s.limit)
        fields = resolve_sft_fields(column_names(records), s)
        ex = build_sft_examples(records, tokenizer, max_length, fields, False, s.prompt_template)
    except ValueError as err:
        raise _user_error(str(err)) from None
    n = len(ex)
    n_val = int(round(n * s.val_fraction)) if n > 1 else 0
    n_val = min(max(n_val, 1 if s.val_fraction > 0 and n > 1 else 0), n - 1)
    if n_val == 0:
        return SFTData(train=ex, val=None, tokenizer=tokenizer)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed))
    return SFTData(train=_subset(ex, perm[n_val:]), val=_subset(ex, perm[:n_val]), tokenizer=tokenizer)


def _subset(ex, idx: torch.Tensor):
    out = copy.copy(ex)
    for name in ("input_ids", "prompt_len", "answer_len", "answer_tokens"):
        setattr(out, name, getattr(ex, name)[idx])
    return out


def prompt_mask(prompt_len: torch.Tensor, length: int) -> torch.Tensor:
    """(B,) prompt lengths -> (B, length) bool, True on prompt positions (kept clean, not scored)."""
    return torch.arange(length, device=prompt_len.device)[None, :] < prompt_len[:, None]


def batch_of(ex, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, prompt_mask) of the rows `indices` of SFTExamples `ex`, on `device`."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    x0 = ex.input_ids[idx].to(device)
    return x0, prompt_mask(ex.prompt_len[idx].to(device), x0.shape[1])


def noise_generator(device, seed: int, *stream: int) -> torch.Generator:
    """A generator on `device` seeded from (seed, *stream)."""
    from lit_gpt.diffusion import seeded_generator

    value = seeded_generator(seed, *stream).initial_seed()
    return torch.Generator(device=device).manual_seed(value)


def sft_loss(model, graph, noise, x0: torch.Tensor, mask: torch.Tensor, eps: float,
             generator: torch.Generator) -> torch.Tensor:
    """The SFT objective of one batch: score entropy of the response given the clean prompt."""
    from remedi_patches.sedd.losses import score_entropy_loss

    return score_entropy_loss(model, graph, noise, x0, prompt_mask=mask, eps=eps, generator=generator).loss


# ---------------------------------------------------------------- the run


@dataclass
class SFTResult:
    losses: list[float]
    evaluation: dict
    export_dir: Optional[Path]
    out_dir: Path


def load_model(s: SFTSettings):
    """(SEDD, tokenizer) through the project's backbone loader; a non-SEDD model is refused."""
    from remedi_patches.backbones import load_backbone
    from remedi_patches.sedd.loading import sedd_model_name

    bb = load_backbone(sedd_model_name(s.pretrained_model), tokenizer=s.tokenizer)
    if bb.kind != "sedd":
        raise _user_error(f"sft.pretrained_model={s.pretrained_model} is a {bb.kind!r} model, not a SEDD; pass a "
                          "SEDD hub name, hub-layout folder or upstream run folder")
    if bb.tokenizer is None or bb.tokenizer.eos_token_id is None:
        raise _user_error("the tokenizer has no EOS token (the SFT padding); pass sft.tokenizer")
    return bb.model, bb.tokenizer


def save_run_config(cfg, s: SFTSettings, overrides: Sequence[str]) -> None:
    from omegaconf import OmegaConf

    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("load_dir", "out_dir")]
    if s.resume is not None:  # keep the first run's list: compose_config already put it in front
        return
    OmegaConf.save(OmegaConf.create(kept), s.out_dir / OVERRIDES_FILE)
    OmegaConf.save(cfg, s.out_dir / CONFIG_FILE, resolve=True)


def train(cfg, overrides: Sequence[str] = ()) -> SFTResult:
    """Fine-tune as `cfg` (compose_config's DictConfig) says; returns the per-step losses of this call."""
    from lit_gpt.training import (FabricConfig, Schedule, TrainGroup, claim_outputs, csv_logger, fit,
                                  grad_accum_steps, micro_batch_rows, setup_fabric, warmup_for)
    from lit_gpt.packed_dataset import SampleOrder
    from remedi_patches.sedd import save_sedd
    from remedi_patches.sedd.graphs import graph_from_config
    from remedi_patches.sedd.noise import noise_from_config
    from remedi_patches.sources import is_hub_name

    s = settings(cfg)
    if s.dataset != "embedded" and not is_hub_name(s.dataset) and not Path(s.dataset).expanduser().exists():
        raise FileNotFoundError(f"sft.dataset={s.dataset}: no such file or folder (and not a hub name org/name)")
    with claim_outputs(s.out_dir):
        model, tokenizer = load_model(s)
        length = s.max_length or model.config.length
        if length > model.config.length:
            raise _user_error(f"sft.max_length {length} exceeds the model's length {model.config.length}; lower it")
        data = load_data(s, tokenizer, length)
        save_run_config(cfg, s, overrides)
        upstream = model.config.to_upstream_dict()
        graph, noise = graph_from_config(upstream, model.config.tokens), noise_from_config(upstream)

        fabric_cfg = FabricConfig(accelerator=s.accelerator, devices=s.ngpus, precision=s.precision)
        fabric = setup_fabric(fabric_cfg, loggers=[csv_logger(s.out_dir)])
        fabric.seed_everything(s.seed)  # dropout draws (a resumed run restores the checkpoint's RNG state)
        G, micro = s.batch_size, s.micro_batch
        grad_accum = grad_accum_steps(G, micro, fabric.world_size)
        if s.freeze_embeddings:
            model.vocab_embed.embedding.requires_grad_(False)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        fabric.print(f"SEDD SFT of {s.pretrained_model} on {s.dataset!r}: {len(data.train)} train / "
                     f"{len(data.val) if data.val is not None else 0} validation rows of {length} tokens, "
                     f"{s.n_iters} steps of {G} ({grad_accum} x {micro} per device), "
                     f"{sum(p.numel() for p in params):,} trainable parameters", flush=True)
        module = fabric.setup(model)
        optimizer = torch.optim.AdamW(params, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.adam_eps,
                                      weight_decay=s.weight_decay, foreach=False)
        optimizer = fabric.setup_optimizers(optimizer)
        ema = EMA(list(model.parameters()), s.ema)
        attach_ema(optimizer, ema)
        state = {"model": module, "optimizer": optimizer, "ema": ema, "iter_num": 0, "step_count": 0}
        order = SampleOrder(len(data.train), s.seed)
        device = fabric.device

        def step_fn(step: int, micro_idx: int):
            module.train()
            rows = micro_batch_rows(micro_idx, micro, fabric.global_rank, fabric.world_size)
            indices = order.indices(step * G, G)[rows]
            x0, mask = batch_of(data.train, indices, device)
            gen = noise_generator(device, s.seed, STREAM_TRAIN, step, rows.start)
            return sft_loss(module, graph, noise, x0, mask, s.eps, gen), {}

        def evaluate() -> dict:
            module.eval()
            total, n = 0.0, len(data.val)
            with torch.no_grad():
                for start in range(0, n, micro):
                    idx = list(range(start, min(n, start + micro)))
                    x0, mask = batch_of(data.val, idx, device)
                    gen = noise_generator(device, s.seed, STREAM_VAL, start)
                    total += float(sft_loss(module, graph, noise, x0, mask, s.eps, gen)) * len(idx)
            module.train()
            return {"val_loss": total / n}

        schedule = Schedule(max_steps=s.n_iters, warmup_steps=warmup_for(s.n_iters, s.warmup), grad_accum=grad_accum,
                            grad_clip=s.grad_clip, save_interval=s.snapshot_freq, eval_interval=s.eval_freq)
        group = TrainGroup(module, optimizer, lr=s.lr, min_lr=s.min_lr, flag="optim.lr")
        result = fit(fabric, state, step_fn, [group], schedule, s.out_dir,
                     evaluate if data.val is not None else None, resume=s.resume,
                     hparams=s.hparams)
        export = None
        if fabric.global_rank == 0:
            final = copy.deepcopy(model).float().eval()
            ema.copy_to(list(final.parameters()))
            export = save_sedd(final, s.out_dir / EXPORT_DIR, tokenizer)
            fabric.print(f"Exported the EMA weights to {export}")
        fabric.barrier()
    return SFTResult(losses=result.losses, evaluation=result.evaluation, export_dir=export, out_dir=s.out_dir)


def main(overrides: Optional[Sequence[str]] = None) -> SFTResult:
    """Compose sft.yaml with Hydra `overrides` and train (what `python SMDM/sedd/sft.py ...` runs)."""
    import sys

    overrides = list(sys.argv[1:] if overrides is None else overrides)
    return train(compose_config(overrides), overrides)
