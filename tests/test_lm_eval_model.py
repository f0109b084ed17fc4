"""lm-evaluation-harness model (eval_llada.py, `llada_dist`): LLaDA's Monte Carlo log-likelihood against a direct
computation with the same random draws, generation through generate() (fast decoding's keys and Fast-dLLM's
use_cache / dual_cache included, with the sampler's cost logged), and `python eval_llada.py` offline on
5 local GSM8K problems."""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="needs the [lmeval] extra: pip install -e .[lmeval]")

from eval_fixtures import reference_answer, tiny_llada_dir, tiny_ups_head  # noqa: E402
from eval_llada import LLaDAEvalHarness, cache_arg, flag_arg  # noqa: E402
from remedi_patches.sampling import optional_number  # noqa: E402
from generate import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(gen_length=8, steps=4, block_length=4, device="cpu", dtype=None)
SAMPLER = dict(steps=4, gen_length=8, block_length=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir):
    return tiny_llada_dir(tmp_path_factory.mktemp("lm_tiny"), data_dir)


def request(kind, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_estimate(model, prefix, target, mask_id, mc_num, batch_size, cfg):
    """LLaDA's estimator written out loop by loop: per minibatch a level k, b evenly spaced mask counts from k
    (wrapped into 1..T), one random permutation per row; loss = sum of masked CE / (count / T), mean over rows."""
    T, Lp = len(target), len(prefix)
    seq = torch.cat([prefix, target])
    losses = []
    for _ in range(mc_num // batch_size):
        k = torch.randint(1, T + 1, ()).item()
        levels = torch.linspace(k, k + (batch_size - 1) * T / batch_size, batch_size)
        rows = [((round(float(level)) - 1) % T + 1, torch.randperm(T)) for level in levels]
        total = 0.0
        for count, perm in rows:
            is_masked = torch.arange(T) < count  # count masks, then scattered by the row's permutation
            masked = torch.cat([torch.zeros(Lp, dtype=torch.bool), is_masked[perm]])
            noisy = seq.masked_fill(masked, mask_id)
            logits = model(noisy[None]).logits[0]
            if cfg > 0:
                un = model(noisy.masked_fill(torch.arange(Lp + T) < Lp, mask_id)[None]).logits[0]
                logits = un + (cfg + 1) * (logits - un)
            total += (F.cross_entropy(logits[masked], seq[masked], reduction="sum") / (count / T)).item()
        losses.append(total / batch_size)
    return -sum(losses) / len(losses)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_loglikelihood_equals_direct_estimator(model_dir, cfg):
    lm = LLaDAEvalHarness(model_path=str(model_dir), batch_size=4, mc_num=8, cfg=cfg, **TINY)
    context, continuation = "Question: Janet has 16 eggs and eats 3 .", " She sells 13 eggs for 2 dollars"
    torch.manual_seed(123)
    ((logprob, greedy),) = lm.loglikelihood([request("loglikelihood", context, continuation)])
    assert greedy is False

    prefix = torch.tensor(lm.tokenizer(context.rstrip())["input_ids"])
    whole = torch.tensor(lm.tokenizer(context + continuation)["input_ids"])
    target = whole[len(prefix):]
    assert len(target) == len(lm.tokenizer(continuation)["input_ids"])
    torch.manual_seed(123)
    expected = direct_estimate(lm.em.model, prefix, target, lm.em.mask_id, 8, 4, cfg)
    assert logprob == pytest.approx(expected, rel=1e-5)
    assert logprob < 0


def test_estimator_is_exact_for_a_one_token_answer(model_dir):
    """With T = 1 every draw masks the single answer token (ratio 1): the estimate is exactly log p(token | prompt)."""

    lm = LLaDAEvalHarness(model_path=str(model_dir), batch_size=2, mc_num=4, **TINY)
    prefix = lm.tokenizer("Janet has 16 eggs")["input_ids"]
    token = lm.tokenizer("eggs")["input_ids"]
    ((logprob, _),) = lm.loglikelihood([request("loglikelihood", "Janet has 16 eggs", " eggs")])
    x = torch.tensor([prefix + [lm.em.mask_id]])
    exact = lm.em.model(x).logits[0, -1].float().log_softmax(-1)[token[0]].item()
    assert logprob == pytest.approx(exact, rel=1e-5)


def test_greedy_check_and_bad_arguments(model_dir):
    lm = LLaDAEvalHarness(model_path=str(model_dir), batch_size=1, mc_num=1, is_check_greedy=True, **TINY)
    prefix = torch.tensor(lm.tokenizer("Janet has 16 eggs")["input_ids"])
    # one token per step, most confident first, over the whole answer: the continuation greedy decoding gives
    greedy = generate(lm.em.model, prefix[None], steps=5, gen_length=5, block_length=5, mask_id=lm.em.mask_id,
                      eos_id=lm.em.eos_id, eot_id=lm.em.eot_id)[0, len(prefix):]
    assert lm.is_greedy(prefix, greedy)
    other = greedy.clone()
    other[2] = (other[2] + 1) % lm.em.mask_id
    assert not lm.is_greedy(prefix, other)
    ((_, flag),) = lm.loglikelihood([request("loglikelihood", "Janet has 16 eggs", " eggs")])
    assert isinstance(flag, bool)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        LLaDAEvalHarness(model_path=str(model_dir), batch_size=3, mc_num=8, **TINY)
    with pytest.raises(ValueError, match="positive integer"):
        LLaDAEvalHarness(model_path=str(model_dir), batch_size="auto", mc_num=8, **TINY)
    with pytest.raises(NotImplementedError, match="rolling"):
        lm.loglikelihood_rolling([])


def test_generate_until_is_the_sampler_with_ups_head_and_stops(model_dir, tmp_path):
    head = tiny_ups_head(tmp_path)
    prompts = ["Question: Janet has 16 eggs .", "How many ?", "She eats three for breakfast"]
    for source, ups_head in (("tps_prob", None), ("ups", head)):
        lm = LLaDAEvalHarness(model_path=str(model_dir), batch_size=2, mc_num=2, confidence_source=source,
                              ups_head_path=ups_head and str(ups_head), **TINY)
        outs = lm.generate_until([request("generate_until", p, {"until": []}) for p in prompts])
        assert outs == [reference_answer(model_dir, lm.tokenizer(p)["input_ids"], SAMPLER, source, ups_head)
                        for p in prompts]
    stop = outs[0].split()[1]
    (cut,) = lm.generate_until([request("generate_until", prompts[0], {"until": [stop], "max_gen_toks": 8})])
    assert cut == outs[0][:outs[0].index(stop)]
    (short,) = lm.generate_until([request("generate_until", prompts[0], {"until": [], "max_gen_toks": 2})])
    assert short == " ".join(outs[0].split()[:2])


def run_cli(model_dir, data_dir, tmp_path, launcher, env_extra=None):
    """`eval_llada.py --tasks gsm8k_local` on the first 5 local GSM8K problems; returns (results, logged samples)."""
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split in ("train", "test"):
        lines = (data_dir / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:5]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    cmd = [*launcher, str(REPO / "eval_llada.py"), "--model", "llada_dist", "--device", "cpu",
           "--include_path", str(REPO / "eval_tasks"), "--tasks", "gsm8k_local", "--num_fewshot", "2",
           "--metadata", json.dumps({"data_dir": str(data)}), "--limit", "5", "--batch_size", "5", "--log_samples",
           "--model_args", f"model_path={model_dir},gen_length=8,steps=4,block_length=4,mc_num=5",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gsm8k_local" in proc.stdout and "exact_match" in proc.stdout
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    (samples_file,) = (tmp_path / "out").rglob("samples_gsm8k_local_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return json.loads(result_file.read_text())["results"]["gsm8k_local"], samples


def check_samples_against_sampler(samples, model_dir):
    """Every logged answer is generate() on the logged context, cut at the task's stop strings."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    for sample in samples:
        context, gen_kwargs = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
        expected = reference_answer(model_dir, tokenizer(context)["input_ids"], SAMPLER)
        for stop in gen_kwargs["until"]:
            expected = expected.split(stop)[0]
        (answers,) = sample["resps"]  # a rank with fewer problems repeats one to keep ranks in step
        assert set(answers) == {expected}


@pytest.mark.slow
def test_eval_llada_cli_offline_gsm8k(model_dir, data_dir, tmp_path):
    """`python eval_llada.py --tasks gsm8k_local` on 5 local GSM8K problems reports exact_match scores."""
    result, samples = run_cli(model_dir, data_dir, tmp_path, [sys.executable])
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert 0.0 <= result[key] <= 1.0
    assert sorted({s["doc_id"] for s in samples}) == [0, 1, 2, 3, 4]
    check_samples_against_sampler(samples, model_dir)


@pytest.mark.slow
def test_eval_llada_two_processes_share_the_problems(model_dir, data_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): each problem is evaluated once, by one rank, and gathered."""
    result, samples = run_cli(model_dir, data_dir, tmp_path,
                              [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
                              {"ACCELERATE_USE_CPU": "1"})
    assert 0.0 <= result["exact_match,flexible-extract"] <= 1.0
    per_filter = [s for s in samples if s["filter"] == "flexible-extract"]
    assert sorted(s["doc_id"] for s in per_filter) == [0, 1, 2, 3, 4]
    check_samples_against_sampler(samples, model_dir)


def test_dual_stream_remedi_generates_by_blocks(tmp_path, data_dir):
    """llada_dist on a dual-stream RemeDi: block diffusion ranked by its own UPS, the answers of block_generate."""
    from remedi_patches.block_decoding import block_generate

    folder = tiny_llada_dir(tmp_path, data_dir, ups_positions=[1])
    lm = LLaDAEvalHarness(model_path=str(folder), batch_size=2, mc_num=2, confidence_source="ups", **TINY)
    contexts = ["Question: Janet has 16 eggs .", "How many ?"]
    answers = lm.generate_until([request("generate_until", c, {"until": []}) for c in contexts])
    assert answers == [reference_answer(folder, lm.tokenizer(c)["input_ids"], SAMPLER, "ups", decode=block_generate)
                       for c in contexts]
    ((logprob, _),) = lm.loglikelihood([request("loglikelihood", "Janet has 16 eggs", " eggs")])
    assert logprob < 0  # the likelihood reads the TPS logits of the dual-stream output


# ---------------------------------------------------------------- fast decoding: keys, aliases, cost


def test_model_args_values_parse_as_lm_eval_passes_them():
    """lm-eval's --model_args give numbers, bools, None or strings: each key's parser takes them all."""
    values = (0.9, 1, "0.9", "none", "", None)
    assert [optional_number("threshold", v) for v in values] == [0.9, 1.0, 0.9, None, None, None]
    assert [optional_number("cache_interval", v, int) for v in (2, "2", "None")] == [2, 2, None]
    assert [flag_arg("use_cache", v) for v in (True, "true", "False", 1, "0", "yes", "none", None)] == [
        True, True, False, True, False, True, None, None]
    # Fast-dLLM's harness flags as aliases of cache
    assert cache_arg(None, True) == "prefix" and cache_arg(None, "true", "true") == "dual"
    assert cache_arg(None, False, False) is None and cache_arg("none", None, None) is None
    assert cache_arg("dual", True, True) == "dual" and cache_arg("prefix") == "prefix"


@pytest.mark.parametrize("keys, message", [
    ({"threshold": "high"}, "threshold must be a number or none, got 'high'"),
    ({"factor": True}, "factor must be a number or none, got True"),
    ({"cache": "dual", "cache_interval": "2.5"}, "cache_interval must be an integer or none, got '2.5'"),
    ({"threshold": 0.9, "factor": 1}, "threshold=0.9 and factor=1.0 are two parallel-decoding rules"),
    ({"threshold": "nan"}, "threshold must be a finite number"),
    ({"cache": "fast"}, "unknown cache 'fast'"),
    ({"cache_interval": 2}, "cache_interval=2 refreshes a KV cache, but cache is None"),
    ({"cache": "prefix", "use_cache": True, "dual_cache": True}, "cache=prefix conflicts with use_cache=true,"
                                                                 "dual_cache=true (= cache=dual)"),
    ({"cache": "dual", "use_cache": "false"}, "cache=dual conflicts with use_cache=false (= cache=none)"),
    ({"dual_cache": "true"}, "dual_cache=true needs use_cache=true"),
    ({"cache": "dual", "dual_cache": True}, "dual_cache=true needs use_cache=true"),
    ({"use_cache": "maybe"}, "use_cache must be true or false, got 'maybe'"),
])
def test_fast_decoding_keys_are_checked_in_one_line_before_loading(keys, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        LLaDAEvalHarness(model_path=str(tmp_path / "never_loaded"), **keys)
    assert "\n" not in str(err.value)


def test_fast_decoding_reaches_the_sampler_and_its_cost_is_logged(model_dir):
    """Fast-dLLM's flags from an lm-eval --model_args string: threshold decoding over the dual cache, answers as
    generate() gives them, and one INFO line with the cost kept in `sampler_cost`."""
    lm = LLaDAEvalHarness.create_from_arg_string(
        f"model_path={model_dir},gen_length=8,steps=4,block_length=4,confidence_source=tps_prob,threshold=0.5,"
        "use_cache=True,dual_cache=true,cache_interval=none,batch_size=1,mc_num=1", {"device": "cpu"})
    assert (lm.settings.threshold, lm.settings.cache, lm.settings.cache_interval) == (0.5, "dual", None)
    contexts = ["Question: Janet has 16 eggs .", "How many ?"]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("lm_eval.llada_dist")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        answers = lm.generate_until([request("generate_until", c, {"until": []}) for c in contexts])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    fast = {**SAMPLER, "threshold": 0.5, "cache": "dual"}
    assert answers == [reference_answer(model_dir, lm.tokenizer(c)["input_ids"], fast, "tps_prob") for c in contexts]
    cost = lm.sampler_cost
    assert (cost.calls, cost.tokens, cost.steps) == (2, 2 * 8, [])  # one call per prompt (batch_size 1), no record
    assert 2 <= cost.nfe <= 8 and cost.tokens_per_second > 0  # 1 to block_length forwards per block of 4
    assert cost.nfe != 4  # not the fixed schedule's 2 blocks x 2 steps
    (line,) = [r.getMessage() for r in records]
    assert line == f"llada_dist sampler: {cost.cost()} (2 sampler calls so far)"
