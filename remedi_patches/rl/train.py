"""RL for diffusion LMs: config, rollouts and step function; the loop is lit_gpt.training.fit (DESIGN.md 11).

    from remedi_patches.rl.train import RLConfig, run
    summary = run(RLConfig())                     # Remask GRPO on the shipped embedded RemeDi and the embedded task
    summary = run(RLConfig(method="diffu_grpo", model_name="embedded"))   # d1's diffu-GRPO on the embedded backbone
    summary = run(RLConfig(method="rwd", model_name="path/to/sedd", gen_length=64))    # a SEDD (rl.sedd)
    CLI: python SMDM/rl/train_rl.py --method remask_grpo --model_name embedded_remedi ...

Every optimizer update trains on `--prompts_per_step` prompts per device, each answered `--group_size` times by
the project's sampler (remedi_patches.sampling.sample) at `--temperature`; a prompt's group is one sampler call
seeded by (--seed, round, prompt), so the rollouts do not depend on how prompts are spread over devices. Rewards
come from remedi_patches.rl.rewards (--reward, --format_reward, or a custom function by Python path). A rollout
batch serves `--mu` updates (round = update // mu); it is kept in the checkpoint, so a killed run resumes exactly.

Methods (--method):
  remask_grpo  RemeDi's Remask RL, for models with a UPS (dual-stream RemeDi): rollouts rank by the UPS with
               Plackett-Luce draws (--ups_temperature); per step index i one forward of the block-causal rows
               [prompt | response | x_t of step i of every block] (rollout.policy_rows) scores the tokens chosen at
               that step (token ratio where a masked position was unmasked) and the order of the kept positions
               (Plackett-Luce ratio per block); PPO-clip --clip_eps on both; advantages (r - mean) / (std + 1e-4).
  diffu_grpo   d1's diffu-GRPO: per-token log-probabilities from one forward with the whole response masked and each
               prompt token masked with probability --p_mask_prompt (one mask per inner iteration, the same for the
               old, reference and current policy); PPO-clip over the response up to its first EOS; r - mean.
  rwd          reward-weighted denoising: the masked-diffusion loss of each rollout weighted by max(A, 0).
  dpo          diffusion DPO on (best, worst) rollouts of each group with different rewards; log-likelihoods are
               minus the masked-diffusion loss (ELBO) under noise shared by policy and reference (--dpo_beta).
--beta > 0 adds beta x KL (k3 estimator) to a frozen reference (the starting weights; with LoRA the base model).

A SEDD (--model_name of backbone kind "sedd") trains by rwd or dpo with its own sampler and score-entropy
likelihoods (remedi_patches.rl.sedd: rows of the longest prompt + --gen_length tokens in the SFT layout, --steps /
--eval_steps reverse-diffusion steps, --temperature the sampler's token temperature); full weights only.

Normalisation: every sum is divided by its count over the whole global batch (tokens, block steps, rollouts or
pairs of all devices and micro-batches), so gradient accumulation and DDP change nothing but rounding. The
official Remask RL sums unnormalised (reference/remedi_official.md E, F.10); the mean keeps one learning rate
meaningful across lengths and step counts.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.diffusion import forward_process, seeded_generator
from lit_gpt.training import (FabricConfig, RunConfig, Schedule, TrainGroup, apply_gradient_checkpointing,
                              claim_outputs, csv_logger, fit, hparams_of, num_parameters, require_finite,
                              require_path, resume_path, setup_fabric)
from remedi_patches import data as sft_data
from remedi_patches.backbones import (EMBEDDED_NAMES, Backbone, EvalModel, detect_kind, embedded_folder,
                                     fsdp_block_classes, load_backbone, max_length_of)
from remedi_patches.block_layout import RemaskRows
from remedi_patches.cli import UserError, arg, fill_none
from remedi_patches.detection import MODEL_META_FILE
from remedi_patches.modeling_wrappers import (HEAD_FILE_NAME, UPSModel, check_head_fits, has_ups_stream, load_ups_head,
                                              logits_of, save_ups_head)
from remedi_patches.remasking import Trajectory, commit_schedule
from remedi_patches.remask_sft import PRECISION_DTYPES, add_lora, export_model, sample_indices
from remedi_patches.rl.objectives import (clipped_surrogate, dpo_loss, group_advantages, kl_k3,
                                          plackett_luce_log_prob, reward_weights, token_log_probs)
from remedi_patches.rl.rewards import load_reward, score
from remedi_patches.rl.rollout import (PolicyRecorder, blocks_valid, completion_mask, end_blocks, policy_rows,
                                       response_rows, scatter_blocks)
from remedi_patches.rl.sedd import SEDDPolicy, export_sedd, refuse_inapplicable, row_length, rows_of
from remedi_patches.sampling import (CHAT_CHOICES, CHAT_HELP, TEMPLATE_HELP, SamplerSettings, check_schedule,
                                     decode_answers, left_pad, prompt_texts, sample)
from remedi_patches.sedd.sft import noise_generator
from remedi_patches.sources import resolve_source
from remedi_patches.trajectory_views import write_text
from remedi_patches.ups_head import UPSHead

METHODS = ("remask_grpo", "diffu_grpo", "rwd", "dpo")
TRAIN_WEIGHTS = ("full", "lora")
STREAM_ROLLOUT, STREAM_PROMPT_MASK, STREAM_NOISE, STREAM_EVAL = 20, 21, 22, 23
# defaults resolved by RLConfig.check(): the embedded model on the embedded task (a CPU-sized run: BENCHMARKS.md
# section 6; lr 1e-5 chosen on the val split), or the official Remask RL's settings (reference/remedi_official.md E)
# for any other model
EMBEDDED_RL = {"group_size": 8, "prompts_per_step": 8, "micro_batch_size": 64, "max_steps": 120, "lr": 1e-5,
               "gen_length": 32, "eval_samples": 200, "warmup_steps": 5}
GENERAL_RL = {"group_size": 16, "prompts_per_step": 1, "micro_batch_size": 2, "max_steps": 100, "lr": 3e-6,
              "gen_length": 256, "eval_samples": 64, "warmup_steps": 10}
SUMMED = ("token_loss", "pl_loss", "kl")  # metrics that are parts of the loss: global sums like it
SCALE_REWARDS = {"remask_grpo": True, "diffu_grpo": False, "rwd": True, "dpo": True}  # d1 uses r - mean


@dataclass
class RLConfig(FabricConfig, RunConfig):
    # model
    model_name: str = arg("embedded_remedi", "'embedded_remedi' (the shipped dual-stream RemeDi), 'embedded' (the "
                          "shipped single-stream backbone), 'embedded_sedd' (the shipped SEDD), a RemeDi / LLaDA "
                          "folder or hub name, an SMDM export folder, or a SEDD (hub-layout or run folder, hub name: "
                          "--method rwd / dpo only)",
                          group="model")
    tokenizer: Optional[str] = arg(None, "tokenizer folder or hub name when the model has none", group="model")
    train_weights: str = arg("full", "full: every weight trains; lora: a LoRA adapter on the frozen model "
                             "(--lora_*)", choices=TRAIN_WEIGHTS, group="model")
    lora_r: int = arg(16, "LoRA rank", group="model")
    lora_alpha: int = arg(32, "LoRA alpha", group="model")
    lora_dropout: float = arg(0.05, "LoRA dropout", group="model")
    lora_target: str = arg("auto", "'auto' (every block's linear layers) or comma-separated module names",
                           group="model")
    load_lora_dir: Optional[str] = arg(None, "continue from this adapter (--train_weights lora)", group="model")
    ups_head: Optional[str] = arg(None, "remask_grpo on a single-stream model: the UPS head (train_remedi.py) that "
                                  "ranks; the policy is backbone + head, and the head trains too (--lr_ups)",
                                  group="model")
    lr_ups: Optional[float] = arg(None, "peak learning rate of the --ups_head; default --lr", group="model")
    # data and reward
    dataset: str = arg("embedded", "'embedded', a local .json/.jsonl/.parquet file or folder, or a hub name",
                       group="data")
    split: str = arg("train", "split whose prompts are rolled out", group="data")
    subset: Optional[str] = arg(None, "dataset config / sub-folder", group="data")
    prompt_field: Optional[str] = arg(None, "prompt field; None: auto-detected", group="data")
    answer_field: Optional[str] = arg(None, "reference answer field; None: auto-detected", group="data")
    chat: str = arg("auto", CHAT_HELP, choices=CHAT_CHOICES, group="data")
    prompt_template: Optional[str] = arg(None, TEMPLATE_HELP, group="data")
    max_records: Optional[int] = arg(None, "use at most this many training prompts", group="data")
    eval_split: Optional[str] = arg(None, "held-out split for --eval_every; default 'val' on the embedded task, "
                                    "else none (no evaluation)", group="data")
    eval_samples: Optional[int] = arg(None, "held-out problems per evaluation (0: none); default 200 on the embedded "
                                      "task, else 64", group="data")
    reward: Optional[str] = arg(None, "'embedded', 'gsm8k', 'math' (graders of remedi_patches.graders; 1 right, 0 "
                                "wrong) or a custom function 'module:function' / 'file.py:function' taking (prompt, "
                                "response, reference); default 'embedded' on the embedded task, else 'gsm8k'",
                                group="data")
    format_reward: float = arg(0.0, "added when the answer has the expected format (#### N, or \\boxed{})",
                               group="data")
    # method
    method: str = arg("remask_grpo", "remask_grpo | diffu_grpo | rwd | dpo (module doc)", choices=METHODS,
                      group="method")
    group_size: Optional[int] = arg(None, "rollouts per prompt (G); default 8 on the embedded task, else 16 (the "
                                    "official 8 x 2)", group="method")
    prompts_per_step: Optional[int] = arg(None, "prompts per device per optimizer update; default 8 on the embedded "
                                          "task, else 1", group="method")
    micro_batch_size: Optional[int] = arg(None, "rollouts per training forward; default 64 on the embedded task, "
                                          "else 2", group="method")
    mu: int = arg(1, "optimizer updates per rollout batch (inner iterations; 1 = on-policy)", group="method")
    clip_eps: float = arg(0.2, "PPO clip epsilon", group="method")
    beta: float = arg(0.0, "KL weight to the frozen reference (0: no reference model, as the official Remask RL)",
                      group="method")
    scale_rewards: Optional[bool] = arg(None, "divide advantages by the group's std (+1e-4); default: yes, except "
                                        "diffu_grpo (d1: r - mean)", group="method")
    p_mask_prompt: float = arg(0.15, "diffu_grpo: probability of masking each prompt token", group="method")
    dpo_beta: float = arg(0.1, "dpo: the DPO temperature beta", group="method")
    # rollouts (the sampler)
    gen_length: Optional[int] = arg(None, "answer tokens per rollout; default 32 on the embedded task, else 256",
                                    group="rollouts")
    block_length: int = arg(32, "block of the sampler (and of remask_grpo's rows); a SEDD ignores it",
                            group="rollouts")
    steps: Optional[int] = arg(None, "denoising steps per rollout (a SEDD's reverse-diffusion steps); default "
                               "gen_length / 2 (the official 16 per block of 32)", group="rollouts")
    temperature: float = arg(1.2, "token sampling temperature of the rollouts (the official 1.2; a SEDD: its "
                             "sampler's token temperature, 1 = upstream)", group="rollouts")
    ups_temperature: float = arg(1.2, "remask_grpo: Plackett-Luce temperature of the UPS ranking", group="rollouts")
    confidence_source: Optional[str] = arg(None, "ranking of the rollouts and the evaluation: default 'ups' for a "
                                           "model with a UPS stream (remask_grpo needs it), else upstream LLaDA "
                                           "low-confidence", group="rollouts")
    # optimisation
    max_steps: Optional[int] = arg(None, "optimizer updates; default 120 on the embedded task, else 100",
                                   group="optimisation")
    lr: Optional[float] = arg(None, "peak learning rate; default 1e-5 on the embedded model, else 3e-6 (the "
                              "official)", group="optimisation")
    min_lr_ratio: float = arg(1.0, "cosine decay ends at ratio x peak (1: constant after warmup)",
                              group="optimisation")
    warmup_steps: Optional[int] = arg(None, "linear warmup updates; default 5 on the embedded model, else 10",
                                      group="optimisation")
    weight_decay: float = arg(0.0, "AdamW weight decay", group="optimisation")
    grad_clip: float = arg(1.0, "gradient-norm clip (0 disables)", group="optimisation")
    # evaluation, checkpoints
    eval_every: int = arg(10, "held-out accuracy every N updates (and after the last; 0: only after the last)",
                          group="evaluation and checkpoints")
    eval_steps: Optional[int] = arg(None, "denoising steps of the evaluation (greedy: temperature 0, UPS top-k); "
                                    "default gen_length (full steps)", group="evaluation and checkpoints")
    save_every: int = arg(10, "resumable checkpoint every N updates (and after the last)",
                          group="evaluation and checkpoints")
    out_dir: str = arg("out/rl", "checkpoints, logs/version_k/metrics.csv, the trained model or adapter",
                       group="evaluation and checkpoints")
    save_model_dir: Optional[str] = arg(None, "where the trained model (full) or adapter (lora) goes; default "
                                        "<out_dir>/model or <out_dir>/lora", group="evaluation and checkpoints")
    seed: int = arg(1234, "seeds prompt order, rollouts, masks and noise", group="evaluation and checkpoints")

    @property
    def embedded(self) -> bool:
        return self.model_name in EMBEDDED_NAMES and self.dataset == "embedded"

    @property
    def output_dir(self) -> Path:
        default = "model" if self.train_weights == "full" else "lora"
        return Path(self.save_model_dir) if self.save_model_dir else Path(self.out_dir) / default

    def resolve_defaults(self) -> "RLConfig":
        fill_none(self, EMBEDDED_RL if self.embedded else GENERAL_RL)
        fill_none(self, {"reward": "embedded" if self.dataset == "embedded" else "gsm8k",
                         "eval_split": "val" if self.dataset == "embedded" else None,
                         "scale_rewards": SCALE_REWARDS.get(self.method, True),
                         "steps": max(1, self.gen_length // 2), "eval_steps": self.gen_length})
        return self

    def check(self) -> "RLConfig":
        """UserError / FileNotFoundError naming the first bad flag and its fix; reads no model or data."""
        self.resolve_defaults()
        self.check_fabric(), self.check_run()
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.train_weights not in TRAIN_WEIGHTS:
            raise UserError(f"--train_weights must be one of {TRAIN_WEIGHTS}, got {self.train_weights!r}")
        for name in ("group_size", "prompts_per_step", "micro_batch_size", "mu", "lora_r"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise UserError(f"--group_size must be >= 2 (advantages compare the rollouts of one prompt: a group of "
                            f"one has none), got {self.group_size}")
        for name in ("max_steps", "eval_every", "save_every", "warmup_steps", "eval_samples"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        checks = {"clip_eps": 0 < self.clip_eps < 1, "beta": 0 <= self.beta < math.inf,
                  "p_mask_prompt": 0 <= self.p_mask_prompt < 1, "dpo_beta": 0 < self.dpo_beta < math.inf,
                  "min_lr_ratio": 0 <= self.min_lr_ratio <= 1, "weight_decay": self.weight_decay >= 0,
                  "grad_clip": self.grad_clip >= 0, "lora_dropout": 0 <= self.lora_dropout < 1,
                  "format_reward": 0 <= self.format_reward < math.inf}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            ranges = {"clip_eps": "(0, 1)", "beta": ">= 0", "p_mask_prompt": "[0, 1)", "dpo_beta": "> 0",
                      "min_lr_ratio": "[0, 1]", "weight_decay": ">= 0", "grad_clip": ">= 0", "lora_dropout": "[0, 1)",
                      "format_reward": ">= 0"}
            raise UserError(f"--{bad[0]} must be {ranges[bad[0]]}, got {getattr(self, bad[0])}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0 (rollouts must explore; the evaluation decodes greedily), "
                            f"got {self.temperature}")
        if self.method == "remask_grpo":
            if self.ups_temperature <= 0:
                raise UserError(f"--ups_temperature must be > 0 for remask_grpo (the Plackett-Luce ranking policy), "
                                f"got {self.ups_temperature}")
            if self.confidence_source not in (None, "ups"):
                raise UserError(f"remask_grpo ranks by the UPS; drop --confidence_source {self.confidence_source}")
        if self.model_kind() == "sedd":
            refuse_inapplicable(self)
        else:
            try:
                for steps in (self.steps, self.eval_steps):
                    check_schedule(steps, self.gen_length, self.block_length)
                self.rollout_settings(has_ups=True)
            except ValueError as err:
                raise UserError(f"{err} (--steps / --eval_steps / --gen_length / --block_length)") from None
        if self.chat not in CHAT_CHOICES:
            raise UserError(f"--chat must be one of {CHAT_CHOICES}, got {self.chat!r}")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise UserError(f"--prompt_template {self.prompt_template!r} has no {{question}} placeholder; add one")
        if self.ups_head is not None and self.method != "remask_grpo":
            raise UserError(f"--ups_head gives remask_grpo its ranking policy; {self.method} does not rank by a UPS: "
                            "drop --ups_head")
        if self.lr_ups is not None and not 0 < self.lr_ups < math.inf:
            raise UserError(f"--lr_ups must be a positive number, got {self.lr_ups}")
        require_path(self.ups_head, "--ups_head")
        if self.load_lora_dir is not None and self.train_weights != "lora":
            raise UserError("--load_lora_dir continues an adapter: add --train_weights lora")
        if self.model_name not in EMBEDDED_NAMES:
            require_path(self.model_name, "--model_name", kind="model")
        require_path(self.tokenizer, "--tokenizer", kind="model")
        if self.dataset != "embedded":
            require_path(self.dataset, "--dataset", kind="dataset")
        load_reward(self.reward, self.format_reward)
        return self

    def model_kind(self) -> Optional[str]:
        """The backbone kind of --model_name, from its folder or hub name (no weights read); None when not found."""
        try:
            return detect_kind(resolve_source(embedded_folder(self.model_name) or self.model_name, "model")).name
        except (ValueError, FileNotFoundError):
            return None

    def source(self, has_ups: bool) -> Optional[str]:
        return self.confidence_source or ("ups" if has_ups else None)

    def rollout_settings(self, has_ups: bool) -> SamplerSettings:
        """The stochastic sampler of the rollouts (block decoding for remask_grpo, whose rows are block-causal)."""
        source = self.source(has_ups)
        return SamplerSettings(steps=self.steps, gen_length=self.gen_length, block_length=self.block_length,
                               temperature=self.temperature, confidence_source=source,
                               ups_temperature=self.ups_temperature if source == "ups" else 0.0,
                               decoding="block" if self.method == "remask_grpo" else None)

    def eval_settings(self, has_ups: bool) -> SamplerSettings:
        """The greedy sampler of the held-out evaluation (temperature 0, UPS top-k)."""
        return self.rollout_settings(has_ups).replace(steps=self.eval_steps, temperature=0.0, ups_temperature=0.0)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Prompts:
    texts: list[str]  # the questions as read (load_prompts); the model-input texts after `encoded`
    references: list[str]  # what the reward compares with (the dataset's answer field)
    ids: Optional[list[list[int]]] = None  # token ids of the model-input texts (after `encoded`)

    def encoded(self, tokenizer, chat: str, template: Optional[str]) -> "Prompts":
        """Model inputs by the project's one prompt rule (sampling.prompt_texts: the chat template, or the plain
        'Question: ...\\nAnswer:' / --prompt_template), as the evaluators build them."""
        try:
            texts, applied = prompt_texts(tokenizer, self.texts, chat, template)
        except ValueError as err:
            raise UserError(f"{err} (--chat)") from None
        return Prompts(texts, self.references, tokenizer(texts, add_special_tokens=not applied)["input_ids"])


def load_prompts(cfg: RLConfig, split: str, limit: Optional[int]) -> Prompts:
    records = sft_data.load_records(cfg.dataset, split, cfg.subset, limit=limit)
    fields = sft_data.resolve_fields(sft_data.column_names(records), prompt_field=cfg.prompt_field,
                                     answer_field=cfg.answer_field)
    if fields.kind != "pair":
        raise UserError(f"--dataset {cfg.dataset}: cannot find a prompt and an answer field among "
                        f"{sorted(sft_data.column_names(records))}; pass --prompt_field and --answer_field")
    records = list(records)
    if not records:
        raise UserError(f"--dataset {cfg.dataset} --split {split} holds no records")
    return Prompts([str(r[fields.prompt]) for r in records], [str(r[fields.answer]) for r in records])


# ---------------------------------------------------------------- rollouts


def policy_forward(model, rows: RemaskRows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One forward of rows -> (TPS logits at the scored positions (M, V), UPS logits there (M,) or None). `model`:
    a dual-stream RemeDi, a UPSModel (backbone + head) or a plain backbone."""
    extra = {} if rows.position_ids is None else {"position_ids": rows.position_ids}
    out = model(rows.input_ids, attention_mask=rows.attention_mask, **extra)
    ups = getattr(out, "confidences", None)
    return logits_of(out)[rows.answer_mask], None if ups is None else ups[rows.answer_mask]


class RLStep:
    """The step function for lit_gpt.training.fit (`self(step, micro) -> (loss, metrics)`); the rollout batch of the
    current round lives in state["rollout"] (checkpointed)."""

    def __init__(self, fabric, cfg: RLConfig, model, reference, bundle: EvalModel, prompts: Prompts, state: dict,
                 sedd: Optional[SEDDPolicy] = None):
        """model: the policy (a dual-stream RemeDi, a UPSModel of backbone + head, a backbone, or a SEDD with its
        `sedd` policy), as set up by Fabric; reference: a frozen copy of it, or None (LoRA: the adapter disabled;
        no KL: unused)."""
        self.fabric, self.cfg, self.model, self.reference, self.bundle = fabric, cfg, model, reference, bundle
        self.prompts, self.state, self.sedd = prompts, state, sedd
        self.settings = None if sedd is not None else cfg.rollout_settings(has_ups(model))
        self.rows_per_rank = cfg.prompts_per_step * cfg.group_size
        # a micro-batch takes `chunk` rollouts (dpo: `chunk` pairs, two rollouts each)
        self.chunk = max(1, cfg.micro_batch_size // 2) if cfg.method == "dpo" else cfg.micro_batch_size
        self.chunks = math.ceil((cfg.prompts_per_step if cfg.method == "dpo" else self.rows_per_rank) / self.chunk)
        remask = cfg.method == "remask_grpo"
        self.steps_per_block = cfg.steps // (cfg.gen_length // cfg.block_length) if remask else 1
        self.grad_accum = self.chunks * self.steps_per_block
        self.scale = fabric.world_size * self.grad_accum
        self.k = commit_schedule(cfg.block_length, self.steps_per_block) if remask else None
        self.reward = load_reward(cfg.reward, cfg.format_reward)
        self.correct = load_reward(cfg.reward) if cfg.format_reward else self.reward

    # -- rollouts -----------------------------------------------------------------------------------------------

    def prompt_indices(self, round_: int) -> list[int]:
        cfg, f = self.cfg, self.fabric
        per_round = cfg.prompts_per_step * f.world_size
        order = sample_indices(cfg.seed, len(self.prompts.texts), round_ * per_round, per_round)
        return order[f.global_rank * cfg.prompts_per_step:(f.global_rank + 1) * cfg.prompts_per_step]

    @torch.no_grad()
    def rollout(self, round_: int) -> dict:
        """G answers to each of this rank's prompts of `round_`, their rewards, advantages and what the method
        needs to score them again (module doc)."""
        cfg, bundle = self.cfg, self.bundle
        groups, traces = [], []
        for idx in self.prompt_indices(round_):
            recorder = PolicyRecorder(bundle.mask_id, cfg.temperature, cfg.ups_temperature) \
                if cfg.method == "remask_grpo" else None
            seed = int(seeded_generator(cfg.seed, STREAM_ROLLOUT, round_, idx).initial_seed())
            response = self.answer_group(self.prompts.ids[idx], seed, recorder)  # (G, A)
            answers = decode_answers(bundle.tokenizer, response, 0, bundle.stop_ids)
            prompts, refs = [self.prompts.texts[idx]] * cfg.group_size, [self.prompts.references[idx]] * cfg.group_size
            groups.append({"prompt": torch.tensor(self.prompts.ids[idx]), "response": response, "index": idx,
                           "reward": score(self.reward, prompts, answers, refs),
                           "correct": score(self.correct, prompts, answers, refs)})
            if recorder is not None:
                traces.append(recorder.stacked(self.steps_per_block))
        prompt, prompt_mask = left_pad([g["prompt"].tolist() for g in groups for _ in range(cfg.group_size)],
                                       bundle.pad_id)
        rewards = torch.cat([g["reward"] for g in groups])
        response = cat_padded([g["response"] for g in groups], bundle.eos_id)  # (R, A)
        ro = {"round": round_, "prompt": prompt, "prompt_mask": prompt_mask, "response": response,
              "rewards": rewards, "correct": torch.cat([g["correct"] for g in groups]),
              "advantages": group_advantages(rewards, cfg.group_size, cfg.scale_rewards),
              "index": torch.tensor([g["index"] for g in groups]),
              "completion": completion_mask(response, bundle.eos_id)}
        if traces:
            ro["valid_blocks"] = end_blocks(response, cfg.block_length, bundle.eos_id)
            nb = cfg.gen_length // cfg.block_length
            for key in traces[0]:
                ro[key] = torch.cat([pad_blocks(t[key], nb) for t in traces])
        ro.update(self.prepare(ro))
        return ro

    def answer_group(self, ids: list[int], seed: int, recorder: Optional[PolicyRecorder]) -> torch.Tensor:
        """(G, A) answers to one prompt from one sampler call seeded by `seed`, on the CPU: the project's sampler
        (A = --gen_length; `recorder` sees its steps), or a SEDD's (rows of the common length, rl.sedd)."""
        cfg, fabric = self.cfg, self.fabric
        if self.sedd is not None:
            generator = torch.Generator(device=fabric.device).manual_seed(seed)
            return self.sedd.sample(self.model, [ids] * cfg.group_size, cfg.steps, cfg.temperature, generator)
        with torch.random.fork_rng(devices=[fabric.device] if fabric.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = sample(self.bundle, torch.tensor([ids] * cfg.group_size), None, self.settings,
                         None if recorder is None else Trajectory(observer=recorder))
        return out[:, len(ids):].cpu()

    def prepare(self, ro: dict) -> dict:
        """Method-specific stored values (old / reference log-probs, pairs) and the global normalisers."""
        cfg, fabric = self.cfg, self.fabric
        extra: dict = {}
        if cfg.method == "remask_grpo":
            blocks = blocks_valid(ro["valid_blocks"], cfg.gen_length // cfg.block_length)  # (R, nb)
            counts = [(ro["unmasked"] & blocks[:, :, None, None]).sum(), blocks.sum() * self.steps_per_block]
        elif cfg.method == "diffu_grpo":  # (mu, R, G): the old (and reference) policy under each inner mask
            extra["old_logp"] = self.chunked_logp(self.model, ro)
            if cfg.beta > 0:
                with self.reference_model() as ref:
                    extra["ref_logp"] = self.chunked_logp(ref, ro)
            counts = [ro["completion"].sum(), torch.tensor(0)]
        elif cfg.method == "rwd":
            counts = [torch.tensor(self.rows_per_rank), torch.tensor(0)]
        else:
            extra["pairs"] = preference_pairs(ro["rewards"], cfg.group_size)
            counts = [torch.tensor(len(extra["pairs"])), torch.tensor(0)]
        r = ro["rewards"].double()
        sums = torch.stack([*(torch.as_tensor(c).double() for c in counts), r.sum(), (r * r).sum(),
                            torch.tensor(float(r.numel()), dtype=torch.float64)])
        total = fabric.all_reduce(sums.to(fabric.device), reduce_op="sum").cpu()
        extra["normaliser"] = total[:2].float().clamp(min=1)
        mean = total[2] / total[4]  # the reward mean / std of the whole global batch (every rank logs the same)
        extra["reward_stats"] = torch.stack([mean, (total[3] / total[4] - mean * mean).clamp(min=0).sqrt()]).float()
        return extra

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference: the model with its LoRA adapter disabled, or the frozen copy of the start."""
        if self.reference is not None:
            yield self.reference
            return
        with unwrap_peft(self.model).disable_adapter():
            yield self.model

    # -- log-probabilities --------------------------------------------------------------------------------------

    def chunked_logp(self, model, ro: dict) -> torch.Tensor:
        """(mu, R, G) one_step_logp of every rollout under each inner iteration's mask, --micro_batch_size rows at a
        time, on the CPU."""
        size, total = self.cfg.micro_batch_size, ro["response"].shape[0]
        return torch.stack([torch.cat([self.one_step_logp(model, ro, k, slice(s, s + size)).cpu()
                                       for s in range(0, total, size)]) for k in range(self.cfg.mu)])

    def one_step_logp(self, model, ro: dict, inner: int, rows: slice) -> torch.Tensor:
        """d1's estimate: (b, G) log p(response token) from one forward with the response masked and each prompt
        token masked with probability --p_mask_prompt (a mask per (round, inner iteration, prompt))."""
        cfg, mask_id = self.cfg, self.bundle.mask_id
        prompt, pm, response = ro["prompt"][rows], ro["prompt_mask"], ro["response"][rows]
        pm = None if pm is None else pm[rows]
        batch = response_rows(prompt, pm, response, self.bundle.eos_id).to(self.fabric.device)
        index = ro["index"].repeat_interleave(cfg.group_size)[rows]
        width = ro["prompt"].shape[1] + ro["response"].shape[1]  # the widest row: the same draws whatever the chunk
        draw = torch.stack([torch.rand(width, generator=seeded_generator(
            cfg.seed, STREAM_PROMPT_MASK, int(ro["round"]), inner, int(i))) for i in index])
        draw = draw[:, :batch.input_ids.shape[1]].to(self.fabric.device)
        masked = batch.answer_mask | ((draw < cfg.p_mask_prompt) & ~batch.answer_mask & batch.attention_mask)
        noisy = batch._replace(input_ids=batch.input_ids.masked_fill(masked, mask_id))
        with self.fabric.autocast():
            logits, _ = policy_forward(model, noisy)
        return token_log_probs(logits, batch.input_ids[batch.answer_mask]).view(response.shape)

    def remask_logp(self, model, ro: dict, rows: slice, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step index i of every block, scored in the block-causal rows -> (token log-probs (b, nb, N) at the
        proposals, Plackett-Luce log-probs (b, nb) of the first k_i picks)."""
        cfg, nb, n = self.cfg, self.cfg.gen_length // self.cfg.block_length, self.cfg.block_length
        pm = ro["prompt_mask"]
        valid = ro["valid_blocks"][rows]
        batch = policy_rows(ro["prompt"][rows], None if pm is None else pm[rows], ro["response"][rows],
                            ro["xt"][rows, :, i], valid, n, self.bundle.eos_id).to(self.fabric.device)
        with self.fabric.autocast():
            logits, ups = policy_forward(model, batch)
        candidates = ro["candidates"][rows, :, i].to(self.fabric.device)  # (b, nb, N)
        used = blocks_valid(valid, nb).to(self.fabric.device)
        token = token_log_probs(logits, candidates[used].view(-1), cfg.temperature)
        token = scatter_blocks(token, valid, nb, n)  # (b, nb, N)
        order = ro["order"][rows, :, i, :self.k[i]].to(self.fabric.device)  # (b, nb, k_i)
        pl = plackett_luce_log_prob(scatter_blocks(ups.float(), valid, nb, n), order, cfg.ups_temperature)
        return token, pl

    # -- the step function --------------------------------------------------------------------------------------

    def __call__(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        round_, inner = divmod(step, cfg.mu)
        if self.state.get("rollout", {}).get("round") != round_:
            self.state["rollout"] = self.rollout(round_)
        ro = self.state["rollout"]
        chunk, index = divmod(micro, self.grad_accum // self.chunks)
        rows = slice(chunk * self.chunk, (chunk + 1) * self.chunk)
        self.step = step
        loss, metrics = getattr(self, cfg.method)(ro, rows, index, inner)
        # fit divides the loss by grad_accum and DDP averages gradients over ranks; the sums above are already
        # divided by global counts, so scale them back (logged parts too: fit averages metrics over both)
        scale = self.scale
        metrics = {k: v * scale if k in SUMMED else v for k, v in metrics.items()}
        metrics.update(reward=ro["reward_stats"][0], reward_std=ro["reward_stats"][1], accuracy=ro["correct"].mean(),
                       adv_abs=ro["advantages"].abs().mean(), response_len=ro["completion"].float().sum(dim=1).mean(),
                       loss=loss.detach() * scale)
        return loss * scale, metrics

    def _advantages(self, ro: dict, rows: slice) -> torch.Tensor:
        return ro["advantages"][rows].to(self.fabric.device)

    def remask_grpo(self, ro: dict, rows: slice, i: int, inner: int) -> tuple[torch.Tensor, dict]:
        cfg, dev = self.cfg, self.fabric.device
        n_tok, n_pl = ro["normaliser"].tolist()
        token, pl = self.remask_logp(self.model, ro, rows, i)
        adv = self._advantages(ro, rows)
        unmasked = ro["unmasked"][rows, :, i].to(dev)  # (b, nb, N)
        blocks = blocks_valid(ro["valid_blocks"][rows], cfg.gen_length // cfg.block_length).to(dev)  # (b, nb)
        unmasked = unmasked & blocks[:, :, None]
        tok_loss, tok_ratio, tok_clip = clipped_surrogate(token - ro["token_logp"][rows, :, i].to(dev),
                                                          adv[:, None, None], cfg.clip_eps)
        pl_loss, pl_ratio, pl_clip = clipped_surrogate(pl - ro["pl_logp"][rows, :, i].to(dev), adv[:, None],
                                                       cfg.clip_eps)
        loss = tok_loss[unmasked].sum() / n_tok + pl_loss[blocks].sum() / n_pl
        metrics = {"token_loss": tok_loss[unmasked].sum().detach() / n_tok,
                   "pl_loss": pl_loss[blocks].sum().detach() / n_pl,
                   "clip_frac": tok_clip[unmasked].float().mean() if unmasked.any() else 0.0,
                   "pl_clip_frac": pl_clip[blocks].float().mean() if blocks.any() else 0.0,
                   "ratio_mean": tok_ratio[unmasked].mean() if unmasked.any() else 1.0,
                   "pl_ratio_mean": pl_ratio[blocks].mean() if blocks.any() else 1.0}
        if cfg.beta > 0:
            with torch.no_grad(), self.reference_model() as ref:
                ref_token, ref_pl = self.remask_logp(ref, ro, rows, i)
            kl = kl_k3(token, ref_token)[unmasked].sum() / n_tok + kl_k3(pl, ref_pl)[blocks].sum() / n_pl
            loss = loss + cfg.beta * kl
            metrics["kl"] = kl.detach()
        return loss, metrics

    def diffu_grpo(self, ro: dict, rows: slice, _i: int, inner: int) -> tuple[torch.Tensor, dict]:
        cfg, dev = self.cfg, self.fabric.device
        n_tok = ro["normaliser"][0]
        logp = self.one_step_logp(self.model, ro, inner, rows)  # (b, G)
        mask = ro["completion"][rows].to(dev)
        per_token, ratio, clipped = clipped_surrogate(logp - ro["old_logp"][inner, rows].to(dev),
                                                      self._advantages(ro, rows)[:, None], cfg.clip_eps)
        loss = per_token[mask].sum() / n_tok
        metrics = {"clip_frac": clipped[mask].float().mean(), "ratio_mean": ratio[mask].mean()}
        if cfg.beta > 0:
            kl = kl_k3(logp, ro["ref_logp"][inner, rows].to(dev))[mask].sum() / n_tok
            loss = loss + cfg.beta * kl
            metrics["kl"] = kl.detach()
        return loss, metrics

    def masked_nll(self, model, ro: dict, rows, step: int) -> torch.Tensor:
        """(b,) masked-diffusion loss of each response (minus its ELBO, per response token): t ~ U(eps, 1) per
        rollout, response tokens masked with probability t, sum CE / t / G; noise seeded by (seed, update, row)."""
        cfg, dev = self.cfg, self.fabric.device
        pm = ro["prompt_mask"]
        batch = response_rows(ro["prompt"][rows], None if pm is None else pm[rows], ro["response"][rows],
                              self.bundle.eos_id).to(dev)
        b, length = batch.input_ids.shape
        width = ro["prompt"].shape[1] + ro["response"].shape[1]  # the widest row: the same draws whatever the chunk
        row_ids = torch.arange(ro["response"].shape[0])[rows]
        gens = [seeded_generator(cfg.seed, STREAM_NOISE, step, int(r)) for r in row_ids]
        t = torch.stack([torch.rand((), generator=g) for g in gens])
        u = torch.stack([torch.rand(width, generator=g)[:length] for g in gens])
        noisy, masked, p_mask = forward_process(batch.input_ids, t.to(dev), u.to(dev), self.bundle.mask_id,
                                                maskable=batch.answer_mask)
        with self.fabric.autocast():
            logits, _ = policy_forward(model, batch._replace(input_ids=noisy))
        ce = torch.nn.functional.cross_entropy(logits.float(), batch.input_ids[batch.answer_mask], reduction="none")
        weight = (masked[batch.answer_mask].float() / p_mask[batch.answer_mask])  # (M,)
        per_row = torch.zeros(b, device=dev).index_add_(0, batch.answer_mask.nonzero()[:, 0], ce * weight)
        return per_row / batch.answer_len.to(dev)

    def nll(self, model, ro: dict, rows, elbo: bool) -> torch.Tensor:
        """(b,) minus the log-likelihood estimate of the rollouts `rows` (a slice or indices) at this update: the
        masked-diffusion loss, or a SEDD's score-entropy loss (elbo: its negative ELBO); the same rows at the same
        update see the same noise, whichever model scores them."""
        if self.sedd is None:
            return self.masked_nll(model, ro, rows, self.step)
        pm, dev = ro["prompt_mask"], self.fabric.device
        x0, prompt = rows_of(ro["prompt"][rows], None if pm is None else pm[rows], ro["response"][rows],
                             self.sedd.row_length)  # (b, L) each
        first = int(torch.arange(ro["response"].shape[0])[rows][0])  # the micro-batch's first rollout names its noise
        generator = noise_generator(dev, self.cfg.seed, STREAM_NOISE, self.step, self.fabric.global_rank, first)
        with self.fabric.autocast():
            return self.sedd.nll(model, x0.to(dev), prompt.to(dev), generator, elbo)

    def rwd(self, ro: dict, rows: slice, _i: int, _inner: int) -> tuple[torch.Tensor, dict]:
        nll = self.nll(self.model, ro, rows, elbo=False)
        weights = reward_weights(self._advantages(ro, rows))
        return (weights * nll).sum() / ro["normaliser"][0], {"nll": nll.mean().detach()}

    def dpo(self, ro: dict, rows: slice, _i: int, _inner: int) -> tuple[torch.Tensor, dict]:
        pairs = ro["pairs"][rows]  # (p, 2) rollout indices (chosen, rejected)
        if pairs.numel() == 0:
            return zero_loss(self.model), {"dpo_acc": 0.0}
        index = pairs.reshape(-1)
        nll = self.nll(self.model, ro, index, elbo=True).view(-1, 2)
        with torch.no_grad(), self.reference_model() as ref:
            ref_nll = self.nll(ref, ro, index, elbo=True).view(-1, 2)
        losses = dpo_loss(nll[:, 0], nll[:, 1], ref_nll[:, 0], ref_nll[:, 1], self.cfg.dpo_beta)
        margin = (ref_nll[:, 0] - nll[:, 0]) - (ref_nll[:, 1] - nll[:, 1])
        return losses.sum() / ro["normaliser"][0], {"dpo_acc": (margin > 0).float().mean()}


# ---------------------------------------------------------------- small helpers


def pad_blocks(x: torch.Tensor, nb: int) -> torch.Tensor:
    """(B, nb_run, ...) -> (B, nb, ...) with zeros for the blocks the sampler never ran (every row had ended)."""
    if x.shape[1] == nb:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], nb - x.shape[1], *x.shape[2:]))], dim=1)


def cat_padded(parts: list[torch.Tensor], value: Optional[int]) -> torch.Tensor:
    """(b_i, A_i) long -> (sum b_i, max A_i), the narrower ones right-padded with `value` (a SEDD's answers are
    wider after shorter prompts)."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([p if p.shape[1] == width else torch.nn.functional.pad(p, (0, width - p.shape[1]), value=value)
                      for p in parts])


def preference_pairs(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P, 2) long (chosen, rejected) rollout indices: the first best and first worst rollout of every group whose
    rewards differ."""
    r = rewards.view(-1, group_size)
    base = torch.arange(r.shape[0]) * group_size
    differ = r.max(dim=1).values > r.min(dim=1).values
    pairs = torch.stack([base + r.argmax(dim=1), base + r.argmin(dim=1)], dim=1)
    return pairs[differ]


def zero_loss(model) -> torch.Tensor:
    """A zero that still reaches every trainable weight (DDP expects a gradient for each)."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def has_ups(model) -> bool:
    """Whether the policy gives UPS confidences: a dual-stream RemeDi, or backbone + head (UPSModel)."""
    return has_ups_stream(model) or isinstance(getattr(model, "module", model), UPSModel)


def unwrap_peft(model):
    """The PEFT model under Fabric's wrapper (for disable_adapter)."""
    inner = getattr(model, "module", model)
    return getattr(inner, "module", inner)


# ---------------------------------------------------------------- the trainer


def run(cfg: RLConfig, backbone: Optional[Backbone] = None) -> dict:
    """Train as configured; returns the final metrics (same on every rank) with "losses" per update."""
    cfg.check()
    out_dir = Path(cfg.out_dir)
    with claim_outputs(out_dir, folders={"--save_model_dir": cfg.save_model_dir}):
        return _run(cfg, backbone, out_dir)


def _run(cfg: RLConfig, backbone: Optional[Backbone], out_dir: Path) -> dict:
    prompts = load_prompts(cfg, cfg.split, cfg.max_records)
    held = load_prompts(cfg, cfg.eval_split, cfg.eval_samples) if cfg.eval_split and cfg.eval_samples else None
    fabric = setup_fabric(cfg, wrap_blocks=fsdp_block_classes() if cfg.strategy == "fsdp" else None,
                          loggers=[csv_logger(out_dir)])
    if backbone is None:
        backbone = load_backbone(cfg.model_name, device=fabric.device, tokenizer=cfg.tokenizer,
                                 dtype=PRECISION_DTYPES.get(cfg.precision or ""))
    if backbone.kind == "sedd":
        refuse_inapplicable(cfg)
    model = backbone.model.to(fabric.device)
    head = load_head(cfg, model, fabric.device)
    window = max_length_of(model)
    fabric.seed_everything(cfg.seed)
    reference = None
    if (cfg.beta > 0 or cfg.method == "dpo") and (cfg.train_weights == "full" or head is not None):
        start = model if head is None else UPSModel(model, head)
        reference = copy.deepcopy(start).requires_grad_(False).eval()
    model.requires_grad_(cfg.train_weights == "full")
    peft_model = None
    if cfg.train_weights == "lora":
        peft_model = add_lora(cfg, model, backbone.kind, trainable=True)
        model = peft_model
    apply_gradient_checkpointing(model, cfg)
    model = fabric.setup_module(model)
    params = [p for p in model.parameters() if p.requires_grad]  # after setup: FSDP's sharded parameters
    opt = fabric.setup_optimizers(torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    tokenizer = backbone.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else backbone.eos_id
    bundle = EvalModel(model=model, tokenizer=tokenizer, ups_head=None, mask_id=backbone.mask_id, pad_id=pad_id,
                       eos_id=backbone.eos_id, eot_id=backbone.eot_id, device=fabric.device)
    prompts = prompts.encoded(tokenizer, cfg.chat, cfg.prompt_template)
    held = None if held is None else held.encoded(tokenizer, cfg.chat, cfg.prompt_template)
    longest = max(len(ids) for ids in prompts.ids) + 2 * cfg.gen_length
    sedd = None
    if backbone.kind == "sedd":  # one row length for rollouts and evaluation (rl.sedd)
        length = row_length(prompts.ids + (held.ids if held is not None else []), cfg.gen_length, window)
        sedd = SEDDPolicy.of(model, length, backbone.eos_id)
    elif window is not None and longest > window:
        raise UserError(f"prompts of up to {longest - 2 * cfg.gen_length} tokens + 2 x --gen_length {cfg.gen_length} "
                        f"exceed the model's window of {window}; lower --gen_length")
    hparams = hparams_of(cfg)
    # checkpoints hold the LoRA weights only (the frozen base comes from --model_name); FSDP saves the module whole
    lora_only = cfg.train_weights == "lora" and cfg.strategy != "fsdp"
    state = {"model": torch.nn.ParameterList(params) if lora_only else model, "optimizer": opt,
             "step_count": 0, "iter_num": 0, "hparams": hparams, "rollout": {}}
    groups = [TrainGroup(model, opt, lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio)]
    policy, raw_head = model, head
    if head is not None:  # its own module, optimizer and learning rate; the policy runs backbone + head
        lr_ups = cfg.lr_ups or cfg.lr
        head = fabric.setup_module(head.requires_grad_(True).train())
        opt_head = fabric.setup_optimizers(torch.optim.AdamW(head.parameters(), lr=lr_ups,
                                                             weight_decay=cfg.weight_decay))
        state.update(head=head, opt_head=opt_head)
        groups.append(TrainGroup(head, opt_head, lr=lr_ups, min_lr=lr_ups * cfg.min_lr_ratio, name="ups",
                                 flag="--lr_ups" if cfg.lr_ups else "--lr"))
        policy = UPSModel(model, head)
    bundle = dataclasses.replace(bundle, model=policy)
    step = RLStep(fabric, cfg, policy, reference, bundle, prompts, state, sedd)
    fabric.print(f"RL ({cfg.method}) on {backbone.name}: {num_parameters(model):,} parameters "
                 f"({num_parameters(model, trainable=True):,} trainable, {cfg.train_weights}); {len(prompts.texts)} "
                 f"prompts, {cfg.max_steps} updates of {cfg.prompts_per_step * fabric.world_size} prompts x "
                 f"{cfg.group_size} rollouts ({cfg.steps} steps, temperature {cfg.temperature}"
                 f"{f', UPS {cfg.ups_temperature}' if step.settings and step.settings.ups_temperature else ''}), "
                 f"mu {cfg.mu}, {step.grad_accum} micro-batches per update")

    def evaluate() -> dict:
        return held_out_accuracy(fabric, bundle, held, cfg, sedd)

    schedule = Schedule(max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, grad_accum=step.grad_accum,
                        grad_clip=cfg.grad_clip, save_interval=cfg.save_every, eval_interval=cfg.eval_every,
                        divergence_factor=0.0)  # an RL loss has no floor to diverge from; NaN/inf still stops
    resume = resume_path(out_dir, cfg.resume)
    if held is not None and resume is None:  # the starting point of the held-out curve
        start = evaluate()
        fabric.log_dict(start, step=0)
        fabric.print("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in start.items()))
    result = fit(fabric, state, step, groups, schedule, out_dir, evaluate if held is not None else None,
                 resume=resume, hparams=hparams)
    return save_outputs(cfg, fabric, state, result, backbone, peft_model, raw_head, out_dir)


def load_head(cfg: RLConfig, model, device) -> Optional[UPSHead]:
    """The --ups_head (checked to fit the model), or None; UserError when remask_grpo would have no UPS."""
    dual = has_ups_stream(model)
    if cfg.ups_head is not None and dual:
        raise UserError(f"{cfg.model_name} has its own UPS stream (a dual-stream RemeDi); drop --ups_head")
    if cfg.method == "remask_grpo" and not dual and cfg.ups_head is None:
        raise UserError(f"remask_grpo trains the UPS ranking policy; {cfg.model_name} has no UPS stream. Use a "
                        "dual-stream RemeDi (e.g. --model_name embedded_remedi), give the model a head with "
                        "--ups_head PATH, or use --method diffu_grpo / rwd / dpo")
    if cfg.ups_head is None:
        return None
    head, _ = load_ups_head(cfg.ups_head)
    check_head_fits(head, model)
    return head.to(device)


@torch.no_grad()
def held_out_accuracy(fabric, bundle: EvalModel, held: Prompts, cfg: RLConfig, sedd: Optional[SEDDPolicy] = None
                      ) -> dict:
    """Greedy accuracy (the reward's correctness part) on the held-out prompts, this rank's share, averaged; a SEDD
    samples at temperature 0 with --eval_steps (which positions unmask stays random: seeded by --seed)."""
    settings = None if sedd is not None else cfg.eval_settings(has_ups(bundle.model))
    correct = load_reward(cfg.reward)
    share = list(range(fabric.global_rank, len(held.texts), fabric.world_size))
    hits = torch.zeros(2, device=fabric.device)
    generator = noise_generator(fabric.device, cfg.seed, STREAM_EVAL, fabric.global_rank) if sedd is not None else None
    with torch.random.fork_rng(devices=[fabric.device] if fabric.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for start in range(0, len(share), 64):
            idx = share[start:start + 64]
            if sedd is not None:
                out = sedd.sample(bundle.model, [held.ids[i] for i in idx], cfg.eval_steps, 0.0, generator)
            else:
                ids, am = left_pad([held.ids[i] for i in idx], bundle.pad_id)
                out = sample(bundle, ids, am, settings)[:, ids.shape[1]:]  # (b, gen_length)
            answers = decode_answers(bundle.tokenizer, out, 0, bundle.stop_ids)
            rewards = score(correct, [held.texts[i] for i in idx], answers, [held.references[i] for i in idx])
            hits += torch.stack([rewards.sum(), torch.tensor(float(len(idx)))]).to(fabric.device)
    hits = fabric.all_reduce(hits, reduce_op="sum")
    return {f"eval_accuracy@{cfg.eval_steps}": float(hits[0] / hits[1].clamp(min=1))}


def save_outputs(cfg: RLConfig, fabric, state: dict, result, backbone: Backbone, peft_model, head: Optional[UPSHead],
                 out_dir: Path) -> dict:
    """The trained model folder (full) or adapter (lora), with the UPS head when one trained and the run's
    settings beside it; the summary."""
    target = cfg.output_dir
    if cfg.train_weights == "full":
        (export_sedd if backbone.kind == "sedd" else export_model)(fabric, out_dir, backbone, target)
    elif fabric.global_rank == 0:
        peft_model.save_pretrained(str(target))
    if fabric.global_rank == 0:
        meta = {"mask_id": backbone.mask_id, "backbone": str(target) if cfg.train_weights == "full" else backbone.name,
                "backbone_kind": backbone.kind, "prompt_template": cfg.prompt_template or
                sft_data.render_prompt("{question}"), "chat": cfg.chat, "rl_args": state["hparams"],
                "updates": state["step_count"], **result.evaluation}
        write_text(target / MODEL_META_FILE, json.dumps(meta, indent=2, default=str) + "\n")
        if head is not None:
            require_finite(head, f"the UPS head for {target}", "Train again with a lower --lr_ups.")
            save_ups_head(target / HEAD_FILE_NAME, head, meta)
        fabric.print(f"{'model' if cfg.train_weights == 'full' else 'LoRA adapter'} -> {target}")
    fabric.barrier()
    summary = {"updates": state["step_count"], "output": str(target),
               "metrics_csv": str(Path(fabric.logger.log_dir) / "metrics.csv"), **result.evaluation}
    fabric.print(json.dumps(summary, indent=2))
    return {**summary, "losses": result.losses}
