"""RL on a SEDD (remedi_patches.rl.sedd through remedi_patches.rl.train, CLI SMDM/rl/train_rl.py): rwd's loss is the
reward-weighted score entropy of the rollouts (prompt clean and unscored), dpo's is dpo_loss on negative ELBOs under
noise shared with the reference (log 2 at the start), a CLI run exports a SEDD that load_backbone reloads and a
killed run resumes exactly, and the flags a SEDD cannot serve give one-line errors.

A tiny random SEDD (window 64) built here, with the embedded tokenizer, on the embedded task's prompts, on the CPU.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_user_error, in_process_user_error, run_cli
from remedi_patches.backbones import EvalModel, load_backbone
from remedi_patches.cli import UserError
from remedi_patches.rl import train as rl_train
from remedi_patches.rl.objectives import dpo_loss
from remedi_patches.rl.sedd import SEDDPolicy, row_length
from remedi_patches.rl.train import STREAM_NOISE, RLConfig, RLStep, load_prompts, run
from remedi_patches.sedd.answers import graph_and_noise
from remedi_patches.sedd.losses import score_entropy_elbo, score_entropy_loss
from remedi_patches.sedd.sft import noise_generator
from sedd_helpers import random_sedd
from trainer_helpers import killed_after_first_checkpoint, load_script

pytestmark = pytest.mark.usefixtures("one_thread")
train_rl = load_script("SMDM/rl/train_rl.py")
WINDOW, GEN = 64, 16
VARIED_REWARD = "def fn(prompt, response, reference):\n    return float(sum(map(ord, response)) % 7)\n"


@pytest.fixture(scope="module")
def sedd_folder(tmp_path_factory) -> Path:
    return random_sedd(tmp_path_factory.mktemp("sedd") / "tiny", WINDOW)


@pytest.fixture(scope="module")
def reward(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("reward") / "reward_fn.py"
    path.write_text(VARIED_REWARD)
    return f"{path}:fn"


def sedd_cfg(folder: Path, out: Path, reward: str, **kw) -> RLConfig:
    """2 prompts x 4 rollouts, 4 reverse-diffusion steps, answers of >= 16 tokens, no held-out evaluation."""
    base = dict(model_name=str(folder), method="rwd", prompts_per_step=2, group_size=4, micro_batch_size=4,
                max_steps=1, eval_samples=0, accelerator="cpu", precision="32-true", steps=4, gen_length=GEN, seed=0,
                max_records=50, warmup_steps=0, lr=1e-3, reward=reward, out_dir=str(out))
    return RLConfig(**{**base, **kw})


def make_step(cfg: RLConfig, backbone) -> RLStep:
    """An RLStep as rl.train._run builds it for a SEDD, on one CPU process, without fit; dpo gets its frozen copy."""
    from lightning_fabric import Fabric

    cfg.check()
    fabric = Fabric(accelerator="cpu", devices=1)
    tok = backbone.tokenizer
    bundle = EvalModel(model=backbone.model, tokenizer=tok, ups_head=None, mask_id=backbone.mask_id,
                       pad_id=tok.pad_token_id, eos_id=backbone.eos_id, eot_id=None, device=fabric.device)
    prompts = load_prompts(cfg, cfg.split, cfg.max_records).encoded(tok, cfg.chat, cfg.prompt_template)
    policy = SEDDPolicy.of(backbone.model, row_length(prompts.ids, cfg.gen_length, WINDOW), backbone.eos_id)
    reference = copy.deepcopy(backbone.model).requires_grad_(False) if cfg.method == "dpo" else None
    return RLStep(fabric, cfg, backbone.model.eval(), reference, bundle, prompts, {"step_count": 0}, policy)


def direct_rows(step: RLStep, ro: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 (R, L), prompt positions (R, L)) of the rollouts, built from the prompt ids and the stored answers."""
    length = step.sedd.row_length
    rows, masks = [], []
    for r, idx in enumerate(ro["index"].repeat_interleave(step.cfg.group_size).tolist()):
        ids = step.prompts.ids[idx]
        rows.append(torch.tensor(ids + ro["response"][r].tolist())[:length])
        masks.append(torch.arange(length) < len(ids))
    return torch.stack(rows), torch.stack(masks)


def num(value) -> float:
    return float(torch.as_tensor(value).detach())


def test_rollouts_are_prompt_then_answer_in_rows_of_the_longest_prompt_plus_gen_length(sedd_folder, reward,
                                                                                      tmp_path):
    step = make_step(sedd_cfg(sedd_folder, tmp_path / "o", reward), load_backbone(sedd_folder))
    ro = step.rollout(0)
    longest = max(len(ids) for ids in step.prompts.ids)
    assert step.sedd.row_length == longest + GEN <= WINDOW
    shortest = min(len(step.prompts.ids[i]) for i in ro["index"].tolist())
    assert ro["response"].shape == (8, step.sedd.row_length - shortest)
    assert ro["rewards"].shape == (8,) and ro["rewards"].std() > 0  # a varied reward: advantages are not all zero
    # the same seed answers the same: one sampler call per prompt, seeded by (seed, round, prompt)
    assert torch.equal(step.rollout(0)["response"], ro["response"])
    assert not torch.equal(step.rollout(1)["response"][:4], ro["response"][:4])


def test_rwd_loss_is_the_reward_weighted_score_entropy_with_the_prompt_clean(sedd_folder, reward, tmp_path):
    """Each micro-batch's loss is sum over its rollouts of max(A, 0) x the per-sequence score entropy (prompt kept
    clean and left out), over the global rollout count, with the noise of (seed, update, rank, first row); the model
    sees x_t with every prompt position clean and some answer positions absorbed."""
    backbone = load_backbone(sedd_folder)
    step = make_step(sedd_cfg(sedd_folder, tmp_path / "o", reward), backbone)
    ro = step.rollout(0)
    step.state["rollout"] = ro
    x0, prompt = direct_rows(step, ro)
    graph, noise = graph_and_noise(backbone.model)
    seen = []
    hook = backbone.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        assert step.grad_accum == 2
        for micro, rows in enumerate([slice(0, 4), slice(4, 8)]):
            loss, metrics = step(0, micro)
            x_t = seen[-1]
            assert torch.equal(x_t[prompt[rows]], x0[rows][prompt[rows]])  # the prompt is never noised
            assert (x_t[~prompt[rows]] == backbone.mask_id).any() and (x_t != backbone.mask_id).any()
            g = noise_generator("cpu", 0, STREAM_NOISE, 0, 0, rows.start)
            with torch.no_grad():
                per = score_entropy_loss(lambda x, s: backbone.model(x, s), graph, noise, x0[rows],
                                         prompt_mask=prompt[rows], generator=g).per_sequence
            expected = (ro["advantages"][rows].clamp(min=0) * per).sum() / 8
            assert num(loss) / step.scale == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
            assert num(metrics["nll"]) == pytest.approx(float(per.mean()), rel=1e-5)
            assert float(expected) > 0
    finally:
        hook.remove()


def test_dpo_loss_is_dpo_loss_on_shared_noise_elbos_and_log2_at_the_start(sedd_folder, reward, tmp_path):
    backbone = load_backbone(sedd_folder)
    step = make_step(sedd_cfg(sedd_folder, tmp_path / "o", reward, method="dpo", micro_batch_size=8), backbone)
    ro = step.rollout(0)
    step.state["rollout"] = ro
    pairs = ro["pairs"]
    assert len(pairs) >= 1 and step.grad_accum == 1
    loss, metrics = step(0, 0)
    assert num(loss) / step.scale == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    with torch.no_grad():  # move the policy: the loss is then dpo_loss on the ELBOs of both, same draws each
        for p in backbone.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    loss, metrics = step(0, 0)
    x0, prompt = direct_rows(step, ro)
    index = pairs.reshape(-1)
    graph, noise = graph_and_noise(backbone.model)

    def nll(model):
        g = noise_generator("cpu", 0, STREAM_NOISE, 0, 0, int(index[0]))
        with torch.no_grad():
            return score_entropy_elbo(lambda x, s: model(x, s), graph, noise, x0[index], prompt[index], n_samples=1,
                                      generator=g).view(-1, 2)

    pol, ref = nll(backbone.model), nll(step.reference)
    expected = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], step.cfg.dpo_beta).sum() / len(pairs)
    assert num(loss) / step.scale == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(expected) - math.log(2)) > 1e-5
    margin = (ref[:, 0] - pol[:, 0]) - (ref[:, 1] - pol[:, 1])
    assert num(metrics["dpo_acc"]) == pytest.approx(float((margin > 0).float().mean()))


def test_cli_rwd_run_exports_a_sedd_and_a_killed_run_resumes_exactly(sedd_folder, reward, tmp_path):
    """3 updates by the CLI (checkpoint every update): metrics.csv, and out_dir/model a SEDD folder that
    load_backbone reloads, moved from the start. Killed after its first checkpoint and resumed, the same run
    continues with the same losses (the rollout batch comes from the checkpoint) and ends at the same weights."""
    argv = ["--model_name", str(sedd_folder), "--method", "rwd", "--prompts_per_step", "1", "--group_size", "4",
            "--max_steps", "3", "--save_every", "1", "--eval_samples", "4", "--eval_every", "0", "--accelerator",
            "cpu", "--precision", "32-true", "--steps", "4", "--eval_steps", "4", "--gen_length", str(GEN), "--seed",
            "0", "--max_records", "50", "--warmup_steps", "0", "--lr", "1e-3", "--reward", reward, "--out_dir",
            str(tmp_path / "full")]
    full = train_rl.main(argv)
    assert full["updates"] == 3 and len(full["losses"]) == 3 and "eval_accuracy@4" in full
    assert Path(full["metrics_csv"]).is_file() and "reward" in Path(full["metrics_csv"]).read_text()
    reloaded = load_backbone(full["output"])
    assert reloaded.kind == "sedd" and reloaded.model.config.length == WINDOW
    start, end = load_file(sedd_folder / "model.safetensors"), load_file(Path(full["output"]) / "model.safetensors")
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    cfg = rl_train.RLConfig(**{**vars(train_rl.parse_config(argv)), "out_dir": str(tmp_path / "killed")})
    killed_after_first_checkpoint(cfg, lambda: load_backbone(sedd_folder), run=rl_train.run)
    resumed = run(cfg, backbone=load_backbone(sedd_folder))
    assert resumed["updates"] == 3 and resumed["losses"] == pytest.approx(full["losses"][1:], abs=1e-6)
    again = load_file(Path(resumed["output"]) / "model.safetensors")
    assert all(torch.allclose(end[k], again[k], atol=1e-6) for k in end)


@pytest.mark.parametrize("extra, fragments", [
    ([], ["remask_grpo", "SEDD", "use --method rwd or dpo"]),  # the default method
    (["--method", "diffu_grpo"], ["diffu_grpo", "use --method rwd or dpo"]),
    (["--method", "rwd", "--train_weights", "lora"], ["--train_weights full"]),
    (["--method", "dpo", "--confidence_source", "ups"], ["drop --confidence_source"]),
    (["--method", "rwd", "--gen_length", "60"], ["--gen_length 60", "window of 64", "lower --gen_length"]),
], ids=["remask_grpo", "diffu_grpo", "lora", "confidence_source", "gen_length"])
def test_cli_refuses_what_a_sedd_cannot_do_in_one_line(sedd_folder, tmp_path, capsys, extra, fragments):
    argv = ["--model_name", str(sedd_folder), "--max_steps", "1", "--eval_samples", "0", "--accelerator", "cpu",
            "--gen_length", str(GEN), "--max_records", "20", "--out_dir", str(tmp_path / "out"), *extra]
    line = in_process_user_error(train_rl.main, argv, capsys)
    for fragment in fragments:
        assert fragment.lower() in line.lower(), line
    assert not (tmp_path / "out" / "model").exists()


def test_a_sedd_given_as_a_backbone_is_refused_at_load_too(sedd_folder, reward, tmp_path):
    """run(cfg, backbone=...) with a --model_name that names no SEDD still refuses a GRPO method on the SEDD."""
    cfg = sedd_cfg(sedd_folder, tmp_path / "o", reward, method="diffu_grpo", model_name="embedded", block_length=16)
    with pytest.raises(UserError, match="use --method rwd or dpo"):
        run(cfg, backbone=load_backbone(sedd_folder))


@pytest.mark.slow
def test_cli_gen_length_error_exits_2_without_traceback_in_a_subprocess(sedd_folder, tmp_path):
    result = run_cli(["SMDM/rl/train_rl.py", "--model_name", str(sedd_folder), "--method", "rwd", "--gen_length",
                      "60", "--max_records", "20", "--eval_samples", "0", "--out_dir", str(tmp_path / "out")])
    assert_user_error(result, "--gen_length")
