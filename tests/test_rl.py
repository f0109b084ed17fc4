"""RL for diffusion LMs (remedi_patches.rl, CLI SMDM/rl/train_rl.py): the Plackett-Luce maths against brute force and
against the sampler's draws, the first inner iteration (ratios 1, clip inactive, recomputed log-probabilities equal
the rollout's), equal rewards training nothing, a zero KL to an identical reference, the block-causal policy rows,
2-process DDP, kill / resume (also mid-round with --mu 2), the other methods, and the CLI's one-line errors.

Everything runs on the shipped tiny models on the CPU: `embedded_remedi` (dual-stream RemeDi, remask_grpo) and
`embedded` (single-stream backbone, diffu_grpo / rwd / dpo), with the embedded task's prompts (one block of 32).
"""
from __future__ import annotations

import csv
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_user_error, in_process_user_error, run_cli
from remedi_patches.backbones import EvalModel, load_backbone
from remedi_patches.cli import UserError
from remedi_patches.remasking import plackett_luce_keys
from remedi_patches.rl import train as rl_train
from remedi_patches.rl.objectives import clipped_surrogate, group_advantages, kl_k3, plackett_luce_log_prob
from remedi_patches.rl.rollout import end_blocks, policy_rows
from remedi_patches.rl.train import Prompts, RLConfig, RLStep, load_prompts, preference_pairs, run
from trainer_helpers import REPO, killed_after_first_checkpoint, load_script, make_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
train_rl = load_script("SMDM/rl/train_rl.py")
DUAL, SINGLE = "embedded_remedi", "embedded"
# a reward that differs between most responses (so advantages are not zero), and one that never does
VARIED_REWARD = "def fn(prompt, response, reference):\n    return float(sum(map(ord, response)) % 7)\n"
CONSTANT_REWARD = "def fn(prompt, response, reference):\n    return {value!r}\n"


def reward_file(tmp_path: Path, source: str, name: str = "reward_fn.py") -> str:
    path = tmp_path / name
    path.write_text(source)
    return f"{path}:fn"


def rl_cfg(tmp_path: Path, name: str, **kw) -> RLConfig:
    """A CPU-sized run: 2 prompts x 4 rollouts, 8 denoising steps, no held-out evaluation, no warmup."""
    base = dict(model_name=DUAL, prompts_per_step=2, group_size=4, max_steps=1, eval_samples=0, accelerator="cpu",
                precision="32-true", steps=8, seed=0, max_records=50, warmup_steps=0, lr=1e-3,
                out_dir=str(tmp_path / name))
    return RLConfig(**{**base, **kw})


def start_weights(model_name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_backbone(model_name).model.state_dict().items()}


def exported(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(summary["output"]) / "model.safetensors")


def num(value) -> float:
    return float(torch.as_tensor(value).detach())


def csv_rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def column(summary: dict, key: str) -> list[float]:
    return [float(r[key]) for r in csv_rows(summary["metrics_csv"])]


def make_step(cfg: RLConfig, backbone) -> RLStep:
    """An RLStep as rl.train._run builds it, on one CPU process, without fit (the model stays in eval mode)."""
    from lightning_fabric import Fabric

    cfg.check()
    fabric = Fabric(accelerator="cpu", devices=1)
    tok = backbone.tokenizer
    bundle = EvalModel(model=backbone.model, tokenizer=tok, ups_head=None, mask_id=backbone.mask_id,
                       pad_id=tok.pad_token_id if tok.pad_token_id is not None else backbone.eos_id,
                       eos_id=backbone.eos_id, eot_id=backbone.eot_id, device=fabric.device)
    prompts = load_prompts(cfg, cfg.split, cfg.max_records).encoded(tok, cfg.chat, cfg.prompt_template)
    return RLStep(fabric, cfg, backbone.model.eval(), None, bundle, prompts, {"step_count": 0})


# ---------------------------------------------------------------- Plackett-Luce


def direct_pl(w: list[float], order: tuple[int, ...]) -> float:
    """P(order) = prod_j w_{o_j} / (1 - sum of the w picked before o_j), in plain Python."""
    p, used = 1.0, 0.0
    for o in order:
        p *= w[o] / (1.0 - used)
        used += w[o]
    return p


@pytest.mark.parametrize("n", [4, 5])
def test_plackett_luce_log_prob_is_the_direct_product_for_every_ordered_pick(n):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(3, n, generator=g) * 2
    tau = 0.7
    for k in sorted({1, 2, n}):
        orders = list(itertools.permutations(range(n), k))
        lp = plackett_luce_log_prob(scores[:, None, :].expand(3, len(orders), n),
                                    torch.tensor(orders).expand(3, len(orders), k), tau)  # (3, P)
        assert lp.shape == (3, len(orders)) and lp.dtype == torch.float32
        for b in range(3):
            exps = [math.exp(s / tau) for s in scores[b].tolist()]
            w = [e / sum(exps) for e in exps]
            direct = [direct_pl(w, o) for o in orders]
            assert lp[b].exp().tolist() == pytest.approx(direct, rel=1e-5, abs=1e-7), (n, k, b)
            assert sum(direct) == pytest.approx(1.0, abs=1e-9)
            assert float(lp[b].double().exp().sum()) == pytest.approx(1.0, abs=1e-5)  # a distribution over orders


def test_plackett_luce_sampler_draws_top2_orders_with_the_log_prob_frequencies():
    """The rollouts' Gumbel-top-k ranking (plackett_luce_keys) draws each ordered top-2 with exp(log-prob): with
    these peaked scores P(0, 1) ~ 0.52, far from an unordered or denominator-free formula's value."""
    torch.manual_seed(0)
    scores, tau, draws = torch.tensor([2.0, 1.0, 0.0, -1.0]), 0.8, 20000
    keys = plackett_luce_keys(scores.expand(draws, 4), tau)
    top2 = keys.argsort(dim=-1, descending=True)[:, :2]
    orders = list(itertools.permutations(range(4), 2))
    lp = plackett_luce_log_prob(scores.expand(len(orders), 4), torch.tensor(orders), tau)
    freq = {o: 0 for o in orders}
    for a, b in top2.tolist():
        freq[(a, b)] += 1
    for o, p in zip(orders, lp.exp().tolist()):
        assert freq[o] / draws == pytest.approx(p, abs=0.015), (o, freq[o] / draws, p)  # > 4 sigma at p = 0.5


# ---------------------------------------------------------------- the first inner iteration


def test_clipped_surrogate_at_ratio_one_is_minus_the_advantage_and_clips_only_away_from_it():
    adv = torch.randn(64, generator=torch.Generator().manual_seed(0))
    loss, ratio, clipped = clipped_surrogate(torch.zeros(64), adv, 0.2)
    assert torch.equal(loss, -adv) and torch.equal(ratio, torch.ones(64)) and not clipped.any()
    # a ratio of 1.5: clipped to 1.2 where it would gain from the advantage (A > 0), kept where it loses (A < 0)
    loss, ratio, clipped = clipped_surrogate(torch.full((64,), math.log(1.5)), adv, 0.2)
    assert torch.allclose(loss, torch.where(adv > 0, -1.2 * adv, -1.5 * adv)) and torch.equal(clipped, adv > 0)


@pytest.mark.parametrize("block_length", [32, 16])
def test_recomputed_remask_log_probs_equal_the_rollouts_and_the_first_step_is_unclipped(tmp_path, block_length):
    """remask_grpo on the dual-stream model: at the rollout's weights, the block-causal rows of every step index give
    the token log-probabilities the sampler recorded (at the positions each step unmasked) and the Plackett-Luce
    log-probabilities of its ordered picks (the sampler ran with a KV cache, the rows with the block-causal mask:
    equal up to rounding). The step function then sees ratios of 1, no clipping, and the loss -A (token part per
    unmasked position, PL part per block step, each over its global count)."""
    cfg = rl_cfg(tmp_path, "recompute", block_length=block_length)
    step = make_step(cfg, load_backbone(DUAL))
    ro = step.rollout(0)
    nb = cfg.gen_length // block_length
    rows = slice(None)
    valid = torch.arange(nb)[None, :] < ro["valid_blocks"][:, None]  # (R, nb)
    assert ro["xt"].shape == (8, nb, step.steps_per_block, block_length) and valid.any()
    n_tok, n_pl = ro["normaliser"].tolist()
    assert n_tok == (ro["unmasked"] & valid[:, :, None, None]).sum() and n_pl == valid.sum() * step.steps_per_block
    for i in range(step.steps_per_block):
        with torch.no_grad():
            token, pl = step.remask_logp(step.model, ro, rows, i)
        unmasked = ro["unmasked"][:, :, i] & valid[:, :, None]
        assert unmasked.any()
        assert torch.allclose(token[unmasked], ro["token_logp"][:, :, i][unmasked], atol=1e-4), i
        assert torch.allclose(pl[valid], ro["pl_logp"][:, :, i][valid], atol=1e-4), i
    step.state["rollout"] = ro
    adv = ro["advantages"]
    for micro in range(step.grad_accum):
        loss, metrics = step(0, micro)
        assert num(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-4)
        assert num(metrics["pl_ratio_mean"]) == pytest.approx(1.0, abs=1e-4)
        assert num(metrics["clip_frac"]) == 0 and num(metrics["pl_clip_frac"]) == 0
        unmasked = ro["unmasked"][:, :, micro] & valid[:, :, None]
        unclipped = -(adv[:, None, None] * unmasked).sum() / n_tok - (adv[:, None] * valid).sum() / n_pl
        assert num(loss) / step.grad_accum == pytest.approx(float(unclipped), abs=1e-4)


def test_diffu_grpo_first_inner_iteration_scores_the_stored_old_log_probs_exactly(tmp_path):
    """diffu_grpo (mu 1) on the single-stream backbone: the one-step estimate at the rollout's weights is the stored
    old log-probability (same forward, same prompt mask), so every ratio is 1 and nothing is clipped."""
    step = make_step(rl_cfg(tmp_path, "d1", method="diffu_grpo", model_name=SINGLE), load_backbone(SINGLE))
    ro = step.rollout(0)
    with torch.no_grad():
        again = step.one_step_logp(step.model, ro, 0, slice(None))
    assert ro["old_logp"].shape == (1, *ro["response"].shape) and torch.equal(again, ro["old_logp"][0])
    step.state["rollout"] = ro
    assert step.grad_accum == 1
    loss, metrics = step(0, 0)
    assert num(metrics["ratio_mean"]) == 1.0 and num(metrics["clip_frac"]) == 0.0
    mask = ro["completion"]
    assert num(loss) == pytest.approx(float(-(ro["advantages"][:, None] * mask).sum() / mask.sum()), abs=1e-6)


# ---------------------------------------------------------------- equal rewards, KL to an identical reference


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_of_equal_rewards_are_zero(scale):
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    assert torch.equal(group_advantages(rewards, 4, scale), torch.zeros(12))
    mixed = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), 4, scale)
    assert mixed[0] > 0 and (mixed[1:4] < 0).all() and torch.equal(mixed[4:], torch.zeros(4))


@pytest.mark.parametrize("value, group", [(0.1, 7), (0.3, 8), (0.3, 6)])
def test_group_advantages_of_equal_non_binary_rewards_are_zero(value, group):
    rewards = torch.full((2 * group,), value)
    for scale in (True, False):
        assert torch.equal(group_advantages(rewards, group, scale), torch.zeros(2 * group)), scale


@pytest.mark.parametrize("value, group", [
    (1.0, 4),
    (0.3, 8),  # the float32 mean of 8 x 0.3 is not 0.3: the residue / (std + 1e-4) must not train
])
def test_equal_rewards_give_no_update(tmp_path, value, group):
    """A reward that is the same for every rollout: zero advantages, a zero loss and gradient, and the exported
    model is the starting one to the bit (AdamW's step of a zero gradient is zero; no weight decay). Adam
    normalises the gradient, so even a tiny non-zero advantage would move every weight by ~lr."""
    cfg = rl_cfg(tmp_path, "constant", reward=reward_file(tmp_path, CONSTANT_REWARD.format(value=value)),
                 weight_decay=0.0, group_size=group, prompts_per_step=1)
    out = run(cfg, backbone=load_backbone(DUAL))
    assert out["updates"] == 1 and out["losses"] == [0.0]
    assert column(out, "adv_abs") == [0.0] and column(out, "reward") == pytest.approx([value])
    start, end = start_weights(DUAL), exported(out)
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)


def test_kl_k3_is_zero_at_the_reference_and_never_negative():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(kl_k3(x, x), torch.zeros(1000))
    kl = kl_k3(x, y)
    assert (kl >= 0).all() and (kl > 0).all()  # 0 only where the log-probs are equal
    assert float(kl_k3(torch.tensor([-1.0]), torch.tensor([-2.0]))) == pytest.approx(math.exp(-1) + 1 - 1)


def test_kl_to_the_frozen_reference_is_zero_at_the_first_update_then_grows(tmp_path):
    """remask_grpo with --beta: the reference is the starting model, so the first update logs kl 0; after one update
    the policy has moved and the KL is positive."""
    cfg = rl_cfg(tmp_path, "kl", beta=0.1, max_steps=2, prompts_per_step=1, steps=4,
                 reward=reward_file(tmp_path, VARIED_REWARD))
    out = run(cfg, backbone=load_backbone(DUAL))
    kl = column(out, "kl")
    assert len(kl) == 2 and abs(kl[0]) <= 1e-6 and kl[1] > 1e-6, kl


# ---------------------------------------------------------------- the policy rows


def test_policy_rows_score_the_valid_blocks_of_x_t_with_block_causal_attention():
    """Two rollouts, blocks of 4, 3 blocks: row 0 ends (EOS) in block 1, row 1 never. The scored positions are the
    x_t copy of each row's decoded blocks, placed after [real prompt | response] at the clean copy's positions;
    a noisy block attends to the prompt, the earlier clean blocks and itself only."""
    eos, mask, n, nb = 2, 9, 4, 3
    prompt = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 5]])  # row 0 left-padded: 3 real tokens
    pm = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    response = torch.tensor([[11, 12, 13, 14, 15, eos, eos, eos, eos, eos, eos, eos], list(range(20, 32))])
    valid = end_blocks(response, n, eos)
    assert valid.tolist() == [2, 3]
    xt = torch.randint(10, 40, (2, nb, n), generator=torch.Generator().manual_seed(0))
    xt[:, :, 1] = mask
    rows = policy_rows(prompt, pm, response, xt, valid, n, eos)
    assert rows.answer_mask.sum(dim=1).tolist() == [8, 12]
    for r, p in enumerate([3, 5]):
        v = int(valid[r]) * n
        ids = rows.input_ids[r]
        assert ids[:p + v].tolist() == prompt[r, 5 - p:].tolist() + response[r, :v].tolist()  # clean copy
        assert ids[rows.answer_mask[r]].tolist() == xt[r].reshape(-1)[:v].tolist()  # the noisy copy is x_t
        scored = rows.answer_mask[r].nonzero().squeeze(1)
        assert scored.tolist() == list(range(p + v, p + 2 * v))
        assert rows.position_ids[r, scored].tolist() == list(range(p, p + v))  # the clean answer's positions
        attend = rows.attention_mask[r, 0]
        for q in scored.tolist():
            j = (q - p - v) // n
            expected = set(range(p)) | set(range(p, p + j * n)) | set(range(p + v + j * n, p + v + (j + 1) * n))
            assert set(attend[q].nonzero().squeeze(1).tolist()) == expected, (r, q)


# ---------------------------------------------------------------- other methods


def test_preference_pairs_take_the_first_best_and_worst_of_groups_whose_rewards_differ():
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0, 2.0, 2.0, 0.0, 5.0, 3.0, 0.0, 0.0, 1.0])
    assert preference_pairs(rewards, 3).tolist() == [[0, 1], [7, 6], [11, 9]]
    assert preference_pairs(torch.ones(6), 3).shape == (0, 2)


@pytest.mark.parametrize("method, extra", [("diffu_grpo", {"beta": 0.04, "mu": 2}), ("rwd", {}), ("dpo", {})])
def test_single_stream_methods_train_with_finite_losses(tmp_path, method, extra):
    cfg = rl_cfg(tmp_path, method, method=method, model_name=SINGLE, max_steps=2,
                 reward=reward_file(tmp_path, VARIED_REWARD), **extra)
    out = run(cfg, backbone=load_backbone(SINGLE))
    assert out["updates"] == 2 and len(out["losses"]) == 2 and all(math.isfinite(x) for x in out["losses"])
    assert any(x != 0 for x in out["losses"])
    if "beta" in extra:
        assert abs(column(out, "kl")[0]) <= 1e-6
    if method == "dpo":
        assert all(0 <= a <= 1 for a in column(out, "dpo_acc"))
    start, end = start_weights(SINGLE), exported(out)
    assert start.keys() == end.keys()
    assert all(torch.isfinite(end[k]).all() for k in end)
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert len(changed) > len(start) // 2, changed


# ---------------------------------------------------------------- kill / resume, DDP


@pytest.mark.slow
@pytest.mark.parametrize("mu", [1, 2])
def test_killed_rl_run_resumes_same_losses_and_model(tmp_path, mu):
    """save_every 1, 3 updates: killed after its first checkpoint and resumed, a run continues the uninterrupted
    run's trajectory. With --mu 2 the kill falls inside round 0: the resumed update 2 must reuse the checkpointed
    rollout batch (rolled out again at the updated weights it would differ)."""
    reward = reward_file(tmp_path, VARIED_REWARD)
    common = dict(max_steps=3, save_every=1, mu=mu, prompts_per_step=1, steps=4, reward=reward)
    load = lambda: load_backbone(DUAL)  # noqa: E731
    full = run(rl_cfg(tmp_path, "full", **common), backbone=load())
    cfg = rl_cfg(tmp_path, "killed", **common)
    killed_after_first_checkpoint(cfg, load, run=rl_train.run)
    assert len(list(Path(cfg.out_dir).glob("iter-*-ckpt.pth"))) == 1
    resumed = run(cfg, backbone=load())
    assert resumed["updates"] == 3 and len(resumed["losses"]) == 2
    assert resumed["losses"] == pytest.approx(full["losses"][1:], abs=1e-6)
    for key in ("reward", "ratio_mean", "pl_ratio_mean"):
        assert column(resumed, key) == pytest.approx(column(full, key)[1:], abs=1e-6), key
    if mu == 2:
        assert column(full, "ratio_mean")[1] != 1.0  # the second inner iteration scores the moved policy
    a, b = exported(full), exported(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    start = start_weights(DUAL)
    assert any(not torch.equal(start[k], a[k]) for k in a)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[dict, list[dict], Path]:
    """The same 2 updates (remask_grpo with --beta) by 1 process x 2 prompts (in-process) and by 2 CPU processes
    (DDP, gloo) x 1 prompt (the CLI): (1-process summary, 2-process metrics rows, 2-process out_dir)."""
    tmp = tmp_path_factory.mktemp("rl_ddp")
    reward = reward_file(tmp, VARIED_REWARD)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run(rl_cfg(tmp, "ddp1", max_steps=2, beta=0.05, reward=reward), backbone=load_backbone(DUAL))
    finally:
        torch.set_num_threads(before)
    argv = ["--model_name", DUAL, "--group_size", "4", "--max_steps", "2", "--eval_samples", "0", "--accelerator",
            "cpu", "--precision", "32-true", "--steps", "8", "--seed", "0", "--max_records", "50", "--warmup_steps",
            "0", "--lr", "1e-3", "--beta", "0.05", "--reward", reward, "--prompts_per_step", "1", "--devices", "2",
            "--strategy", "ddp", "--out_dir", str(tmp / "ddp2")]
    proc = subprocess.run([sys.executable, str(REPO / "SMDM" / "rl" / "train_rl.py"), *argv], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, csv_rows(str(tmp / "ddp2" / "logs" / "version_0" / "metrics.csv")), tmp / "ddp2"


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(ddp_runs):
    """2 processes x 1 prompt follow 1 process x 2 prompts: rollouts are seeded per prompt and the normalisers are
    the global batch's, so the same rewards, losses and weights."""
    one, two, out2 = ddp_runs
    assert len(two) == 2
    for key in ("loss", "reward", "reward_std", "accuracy", "adv_abs"):
        assert [float(r[key]) for r in two] == pytest.approx(column(one, key), rel=1e-5, abs=1e-6), key
    a, b = exported(one), load_file(out2 / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Adam moves a weight by ~lr whatever its gradient's size, so the few weights whose gradient is rounding noise
    # (e.g. the UPS output bias: Plackett-Luce is shift-invariant) may differ by up to lr per update; all others agree
    assert float(diff.max()) <= 2 * 2 * 1e-3 and int((diff > 1e-5).sum()) <= 20, int((diff > 1e-5).sum())
    start = start_weights(DUAL)
    assert sum(int((a[k] != start[k]).sum()) for k in a) > diff.numel() // 2  # the runs did train


@pytest.mark.slow
def test_two_process_ddp_logs_the_global_loss_parts(ddp_runs):
    """The logged parts of the loss are the global batch's, as the loss is: the same under DDP."""
    one, two, _ = ddp_runs
    for key in ("token_loss", "pl_loss", "kl"):
        assert [float(r[key]) for r in two] == pytest.approx(column(one, key), rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------- CLI errors


@pytest.mark.parametrize("extra, fragments", [
    (["--model_name", SINGLE], ["remask_grpo", "no UPS stream", "--method diffu_grpo"]),
    (["--temperature", "0"], ["--temperature must be > 0"]),
    (["--group_size", "1"], ["--group_size must be >= 2"]),
    (["--reward", "nosuch"], ["nosuch"]),
    (["--method", "diffu_grpo", "--clip_eps", "1.5"], ["--clip_eps must be (0, 1)"]),
], ids=["no_ups_stream", "temperature", "group_size", "reward", "clip_eps"])
def test_cli_errors_are_one_line(tmp_path, capsys, extra, fragments):
    argv = ["--max_steps", "1", "--eval_samples", "0", "--accelerator", "cpu", "--out_dir", str(tmp_path / "out"),
            *extra]
    line = in_process_user_error(train_rl.main, argv, capsys)
    for fragment in fragments:
        assert fragment.lower() in line.lower(), line
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.slow
def test_cli_error_exits_2_without_traceback_in_a_subprocess(tmp_path):
    result = run_cli(["SMDM/rl/train_rl.py", "--group_size", "1", "--out_dir", str(tmp_path / "out")])
    assert_user_error(result, "--group_size")


def test_prompts_follow_the_one_prompt_rule_chat_template_or_plain(tmp_path):
    """RL prompts are built as the evaluators build them: the chat template (one user turn, its special tokens
    already in the text) when the tokenizer has one and --chat is auto / on, else the plain 'Question: ...' rule."""
    raw = Prompts(["what is 2+3?"], ["#### 5"])
    chat_tok = make_char_tokenizer(tmp_path / "chat", chat_template=True)
    chat = raw.encoded(chat_tok, "auto", None)
    assert chat.texts == ["<user>what is 2+3?<bot>"] and chat.references == ["#### 5"]
    assert chat.ids == [chat_tok("<user>what is 2+3?<bot>", add_special_tokens=False)["input_ids"]]
    plain = raw.encoded(chat_tok, "off", None)
    assert plain.texts == ["Question: what is 2+3?\nAnswer:"]
    with pytest.raises(UserError, match="--chat"):
        raw.encoded(make_char_tokenizer(tmp_path / "plain"), "on", None)
