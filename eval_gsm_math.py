"""GSM8K / MATH accuracy of a masked-diffusion LM under one or more confidence sources (the seeds' eval_gsm_math.py).

    python eval_gsm_math.py                                  # embedded model, 50 held-out embedded problems
    python eval_gsm_math.py --model_name GSAI-ML/LLaDA-8B-Base --ups_head checkpoints/ups_head.safetensors \\
        --dataset ../shared/data/gsm8k/test.jsonl --format gsm8k --max_samples 50 --infer_bs 1 \\
        --steps 128 --gen_length 128 --block_length 16 --eos_gating --confidence_sources ups tps_prob random
    python eval_gsm_math.py --dataset ../shared/data/math500/test.jsonl --format math ...
    python eval_gsm_math.py --predictions out/eval_gsm_math/predictions.jsonl    # re-grade a saved run, no model

A source is a confidence-source name of remedi_patches.confidence (ups, tps_prob, random, margin, entropy),
`NAME:noremask` (the same ranking, but committed tokens are never re-masked), or `upstream` (LLaDA's own sampler
with --remasking). Every source runs with the same sampler settings and starts from torch.manual_seed(--seed).
'ups' needs a UPS: --ups_head, or a model with its own UPS stream (a dual-stream RemeDi, e.g.
`--model maple-research-lab/RemeDi-Instruct`, which decodes by blocks with a KV cache unless --decoding llada);
--ups_temperature > 0 draws the 'ups' ranking (Plackett-Luce), the other sources rank greedily.
Prompts are sorted by length before batching (--infer_bs) to waste little on left padding.

Writes to --out_dir: predictions.jsonl (one row per problem and source: index, source, format, prompt, output,
extracted, gold, correct, seconds, nfe = model forwards of the sampler call that answered it, tokens = its answer
positions, i.e. gen_length, token_accuracy), summary.json and summary.md (accuracy = exact match of the final
answer, token accuracy = mean token_accuracy, coverage = share of outputs with an extractable answer, n, mean
seconds per problem, NFE = mean nfe per problem, tokens/s = sum of tokens / sum of seconds, per source;
summary.json also holds the settings, the fast-decoding ones --threshold, --factor, --cache, --cache_interval
included). The summary is computed from the rows alone, so re-grading the predictions file with the same graders
reproduces it exactly; rows written before nfe / tokens / token_accuracy existed re-grade too (those columns then
None, '-' in the table).

token_accuracy (remedi_patches.metrics.answer_token_accuracy) is token-level accuracy on the answer span: the
reference answer (the dataset's full solution, e.g. GSM8K's worked answer ending in `#### N`) tokenised by the
model's tokenizer without special tokens and followed by EOS, as SFT trains it, against the sampled answer's tokens
up to and including its first EOS / EoT, position by position from the answer start; it is the fraction of the
reference positions (EOS included) holding the same token, missing positions counting wrong. It needs the
tokenizer, so re-grading keeps each row's value as written.

Flags are checked before any model is loaded; a second run on the same --out_dir refuses while the first holds it
(remedi_patches.run_lock). Files are written to a temporary file of this process and renamed into place.

From Python (the demo and bench/bench_embedded_accuracy.py do this):
    em = ModelSpec(ups_head_path="out/remedi/ups_head.safetensors").load()   # remedi_patches.model_args
    items = make_items(load_records("embedded", "test", limit=50), "gsm8k")
    predictions, summary = evaluate(em, items, parse_runs(["ups", "tps_prob"]), SamplerSettings(32, 32, 32))
    print(markdown_table(summary))
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tqdm import tqdm

from remedi_patches.backbones import EvalModel, max_length_of
from remedi_patches.cli import ArgumentParser, run_main
from remedi_patches.confidence import get_confidence_source
from remedi_patches.data import column_names, json_records, load_records, render_prompt, resolve_fields
from remedi_patches.graders import extract_boxed, extract_gsm8k_answer, grade_gsm8k, grade_math
from remedi_patches.metrics import answer_token_accuracy
from remedi_patches.model_args import add_model_args, model_spec_from_args
from remedi_patches.modeling_wrappers import has_ups_stream
from remedi_patches.remasking import Trajectory
from remedi_patches.run_lock import RunLock
from remedi_patches.trajectory_views import write_text
from remedi_patches.sampling import (CHAT_CHOICES, CHAT_HELP, FAST_DECODING_FIELDS, LENGTH_DEFAULTS, TEMPLATE_HELP,
                                     PromptWindow, SamplerSettings, add_sampler_args, check_sampler_args,
                                     decode_answers, encode_texts, needs_ups_head, prompt_texts, sample,
                                     settings_from_args, uses_chat)

FORMATS = ("gsm8k", "math")
NOREMASK = ":noremask"
UPSTREAM = "upstream"
BOXED_HINT = "Put the final answer in \\boxed{}."
PREDICTION_KEYS = ("index", "source", "format", "prompt", "output", "extracted", "gold", "correct", "seconds")
COST_KEYS = ("nfe", "tokens")  # written by every run since fast decoding; absent from older predictions files
TOKEN_ACCURACY = "token_accuracy"  # written since token-level accuracy; absent from older predictions files
EVAL_DEFAULTS = LENGTH_DEFAULTS  # None = from the model's window (remedi_patches.sampling.default_lengths)
DEFAULT_SOURCES = ("ups", "tps_prob", "random")  # without --ups_head: the same minus 'ups'


# ---------------------------------------------------------------- runs (what is compared)


@dataclass(frozen=True)
class Run:
    """How to sample: a confidence source (None = upstream LLaDA), whether committed tokens may be re-masked, and
    for 'ups' the Plackett-Luce ranking temperature (0 = greedy; --ups_temperature)."""

    source: Optional[str]
    remask: bool = True
    ups_temperature: float = 0.0

    @property
    def label(self) -> str:
        if self.source is None:
            return UPSTREAM
        return self.source if self.remask else self.source + NOREMASK

    def settings(self, base: SamplerSettings) -> SamplerSettings:
        """`base` with this run's confidence source, re-masking and UPS ranking temperature."""
        return base.replace(confidence_source=self.source, remask=self.remask, ups_temperature=self.ups_temperature)


def parse_run(text: str, no_remask: bool = False, ups_temperature: float = 0.0) -> Run:
    """'ups' | 'ups:noremask' | 'upstream' -> Run; no_remask turns re-masking off for every source;
    ups_temperature applies to the 'ups' runs (the others rank by their own confidence)."""
    if text == UPSTREAM:
        return Run(None, remask=False)
    name, remask = (text[: -len(NOREMASK)], False) if text.endswith(NOREMASK) else (text, not no_remask)
    try:
        get_confidence_source(name)
    except ValueError as err:
        raise ValueError(f"{err}; a source may also be NAME{NOREMASK} or {UPSTREAM!r}") from None
    return Run(name, remask, ups_temperature if name == "ups" else 0.0)


def parse_runs(texts: Sequence[str], no_remask: bool = False, ups_temperature: float = 0.0) -> list[Run]:
    runs = [parse_run(t, no_remask, ups_temperature) for t in texts]
    labels = [r.label for r in runs]
    if not runs or len(set(labels)) != len(labels):
        raise ValueError(f"--confidence_sources must name at least one source, each once; got {list(texts)}")
    if ups_temperature and not any(r.source == "ups" for r in runs):
        raise ValueError(f"--ups_temperature {ups_temperature} applies to the 'ups' source, which is not among "
                         f"{labels}; add ups to --confidence_sources or drop --ups_temperature")
    return runs


# ---------------------------------------------------------------- problems and grading


@dataclass(frozen=True)
class EvalItem:
    index: int   # position in the dataset (pairs rows of different sources)
    prompt: str  # the plain prompt (render_prompt(question, template)); the model input unless a chat template applies
    gold: str    # GSM8K: the final number; MATH: the reference answer
    reference: str = ""  # the dataset's full solution (infer_compare.py draws tokens against it)
    question: Optional[str] = None  # the question as written (None: `prompt` is used as written)
    template: Optional[str] = None  # the --prompt_template it was rendered with


def question_item(index: int, question: str, template: Optional[str] = None) -> EvalItem:
    """An ungraded item for a free prompt (generate.py / infer_compare.py --prompt), by the one prompt rule."""
    return EvalItem(index, render_prompt(question, template), "", question=question, template=template)


def item_texts(tokenizer, items: Sequence[EvalItem], chat: str = "auto") -> tuple[list[str], bool]:
    """The model-input texts of `items` by the one prompt rule (remedi_patches.sampling.prompt_texts) and whether
    the chat template was applied."""
    applied = uses_chat(tokenizer, chat)
    texts = [prompt_texts(tokenizer, [it.prompt if it.question is None else it.question], chat,
                          "{question}" if it.question is None else it.template)[0][0] for it in items]
    return texts, applied


def _gold(text: str, fmt: str, index: int, field: str) -> str:
    if fmt == "gsm8k":
        gold = extract_gsm8k_answer(text)
        if gold is None:
            raise ValueError(f"record {index}: field {field!r} holds no number ({text[:80]!r}); pass the field with "
                             "the reference answer via --answer_field")
        return gold
    return extract_boxed(text) or text.strip()


def make_items(records: Iterable[dict], fmt: str, prompt_template: Optional[str] = None,
               prompt_field: Optional[str] = None, answer_field: Optional[str] = None) -> list[EvalItem]:
    """Records -> EvalItems. Fields are found as in training (remedi_patches.data.resolve_fields: GSM8K
    question/answer, MATH problem/...); for --format math the gold is the `answer` column when there is one,
    else the last \\boxed{} of the solution. The default prompt is the embedded task's "Question: ...\\nAnswer:"
    (for math with a request to box the answer); prompt_template uses {question}."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; use one of {FORMATS}")
    records = list(records)
    columns = column_names(records)
    fields = resolve_fields(columns, prompt_field=prompt_field, answer_field=answer_field)
    if fields.kind != "pair":
        raise ValueError(f"cannot find a question and an answer field among {sorted(columns)}; pass --prompt_field "
                         "and --answer_field")
    gold_field = fields.answer
    if fmt == "math" and answer_field is None and "answer" in columns:
        gold_field = "answer"
    items = []
    for i, record in enumerate(records):
        question = str(record[fields.prompt])
        if fmt == "math" and prompt_template is None:
            question = f"{question}\n{BOXED_HINT}"
        prompt = render_prompt(question, prompt_template)
        gold = _gold(str(record[gold_field]), fmt, i, gold_field)
        items.append(EvalItem(i, prompt, gold, str(record[fields.answer]), question, prompt_template))
    return items


def grade(fmt: str, output: str, gold: str) -> tuple[Optional[str], bool]:
    """(extracted answer or None, correct) of one output, with remedi_patches.graders."""
    if fmt == "gsm8k":
        return extract_gsm8k_answer(output), grade_gsm8k(output, gold)
    if fmt == "math":
        return extract_boxed(output), grade_math(output, gold)
    raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")


# ---------------------------------------------------------------- sampling


def sample_answer_ids(em: EvalModel, texts: list[str], settings: SamplerSettings, chat_applied: bool = False,
                      fit: Optional[PromptWindow] = None, trajectory=None) -> tuple[torch.Tensor, int]:
    """Answer positions sampled for model-input `texts` (item_texts; one left-padded batch, left-cropped by `fit`,
    by default the model's window) -> (answer ids (B, gen_length), padded prompt length)."""
    if needs_ups_head(em, settings):
        raise ValueError("source 'ups' needs a UPS head: pass --ups_head (a head written by train_remedi.py), "
                         "or drop 'ups' from --confidence_sources")
    fit = fit or PromptWindow(max_length_of(em.model), settings.gen_length)
    ids, attention_mask = fit.crop_batch(*encode_texts(em.tokenizer, texts, chat_applied))
    out = sample(em, ids, attention_mask, settings, trajectory)  # (B, Lp + gen_length)
    return out[:, ids.shape[1]:], ids.shape[1]


def sample_texts(em: EvalModel, texts: list[str], settings: SamplerSettings, chat_applied: bool = False,
                 fit: Optional[PromptWindow] = None, trajectory=None) -> tuple[list[str], int]:
    """sample_answer_ids decoded -> (answers cut at EOS/EoT, padded prompt length)."""
    answer_ids, prompt_len = sample_answer_ids(em, texts, settings, chat_applied, fit, trajectory)
    return decode_answers(em.tokenizer, answer_ids, 0, em.stop_ids), prompt_len


def reference_ids(em: EvalModel, items: Sequence[EvalItem]) -> list[Optional[list[int]]]:
    """The reference answer of each item tokenised as SFT tokenises answers (no special tokens); None where an
    item has no reference or the model no EOS (no token accuracy then)."""
    eos = em.eos_id if em.eos_id is not None else em.tokenizer.eos_token_id
    return [em.tokenizer(it.reference, add_special_tokens=False)["input_ids"] if it.reference and eos is not None
            else None for it in items]


def row_token_accuracy(em: EvalModel, answer: Sequence[int], reference: Optional[list[int]]) -> Optional[float]:
    """answer_token_accuracy of one sampled answer (its gen_length ids) against reference_ids' entry."""
    if reference is None:
        return None
    eos = em.eos_id if em.eos_id is not None else em.tokenizer.eos_token_id
    return answer_token_accuracy(answer, reference, em.stop_ids or [eos], eos)


def evaluate(em: EvalModel, items: Sequence[EvalItem], runs: Sequence[Run], settings: SamplerSettings, *,
             fmt: str = "gsm8k", batch_size: int = 1, seed: int = 0, chat: str = "auto",
             progress: bool = True) -> tuple[list[dict], dict]:
    """Sample and grade every item under every run -> (prediction rows, summary).

    Runs share `settings` and each starts from torch.manual_seed(seed). Items are batched by prompt length;
    rows come back in item order per run. `seconds` is the batch's wall time divided by its size, `nfe` the model
    forwards of the batch's sampler call, `tokens` the row's answer positions (gen_length) and `token_accuracy`
    its token-level accuracy on the answer span (module docstring; None without a reference). Prompts longer
    than the model's window leaves after gen_length are left-cropped, with one warning for the whole run.
    """
    if batch_size < 1:
        raise ValueError(f"--infer_bs must be >= 1, got {batch_size}")
    run_settings = [run.settings(settings) for run in runs]
    for run, rs in zip(runs, run_settings):
        if needs_ups_head(em, rs):
            raise ValueError(f"source {run.label!r} needs a UPS head: pass --ups_head (a head written by "
                             "train_remedi.py), or drop it from --confidence_sources")
    if not items:
        raise ValueError("no problems to evaluate; check --dataset / --split / --max_samples")
    fit = PromptWindow(max_length_of(em.model), settings.gen_length)  # one-line error if gen_length cannot fit
    texts, applied = item_texts(em.tokenizer, items, chat)
    lengths = [len(ids) for ids in em.tokenizer(texts, add_special_tokens=not applied)["input_ids"]]
    fit.report(lengths)  # the one cropping warning of the run
    references = reference_ids(em, items)
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rows = []
    for run, rs in zip(runs, run_settings):
        torch.manual_seed(seed)
        run_rows = []
        with tqdm(total=len(items), desc=run.label, disable=not progress, file=sys.stderr) as bar:
            for batch in batches:
                cost = Trajectory(record_steps=False)  # the call's forwards (NFE), no per-step record
                start = time.perf_counter()
                answer_ids, _ = sample_answer_ids(em, [texts[i] for i in batch], rs, applied, fit, cost)
                seconds = (time.perf_counter() - start) / len(batch)
                answers = decode_answers(em.tokenizer, answer_ids, 0, em.stop_ids)
                for i, output, answer in zip(batch, answers, answer_ids.tolist()):
                    item = items[i]
                    extracted, correct = grade(fmt, output, item.gold)
                    run_rows.append({"index": item.index, "source": run.label, "format": fmt, "prompt": texts[i],
                                     "output": output, "extracted": extracted, "gold": item.gold,
                                     "correct": correct, "seconds": seconds, "nfe": cost.forwards,
                                     "tokens": rs.gen_length,
                                     TOKEN_ACCURACY: row_token_accuracy(em, answer, references[i])})
                bar.update(len(batch))
        rows += sorted(run_rows, key=lambda r: r["index"])
    return rows, summarise(rows)


# ---------------------------------------------------------------- summary and re-grading


def summarise(rows: Sequence[dict]) -> dict:
    """Per source, in order of first appearance: n, correct, accuracy (exact match), token_accuracy (mean of the
    rows'), coverage, mean seconds per problem, nfe (mean per problem) and tokens_per_second (sum of tokens / sum of
    seconds); token_accuracy, nfe and tokens_per_second are None when a row of the source lacks its field (a
    predictions file written before it existed, or an item without a reference)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["source"], []).append(row)
    results = []
    for source, group in groups.items():
        n = len(group)
        correct = sum(bool(r["correct"]) for r in group)
        seconds = sum(r["seconds"] for r in group)
        nfe = [r.get("nfe") for r in group]
        tokens = [r.get("tokens") for r in group]
        token_acc = [r.get(TOKEN_ACCURACY) for r in group]
        results.append({"source": source, "n": n, "correct": correct, "accuracy": correct / n,
                        TOKEN_ACCURACY: None if None in token_acc else sum(token_acc) / n,
                        "coverage": sum(r["extracted"] is not None for r in group) / n,
                        "mean_seconds": seconds / n,
                        "nfe": None if None in nfe else sum(nfe) / n,
                        "tokens_per_second": None if None in tokens or seconds <= 0 else sum(tokens) / seconds})
    return {"results": results}


def markdown_table(summary: dict) -> str:
    """The summary as a Markdown table, one row per source ('-' for a column an older predictions file lacks)."""
    lines = ["| source | accuracy | token acc. | coverage | n | s / problem | NFE | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["results"]:
        nfe, speed, token_acc = r.get("nfe"), r.get("tokens_per_second"), r.get(TOKEN_ACCURACY)
        lines.append(f"| {r['source']} | {r['accuracy']:.3f} | {'-' if token_acc is None else f'{token_acc:.3f}'} | "
                     f"{r['coverage']:.3f} | {r['n']} | "
                     f"{r['mean_seconds']:.3f} | {'-' if nfe is None else f'{nfe:.1f}'} | "
                     f"{'-' if speed is None else f'{speed:.1f}'} |")
    return "\n".join(lines)


def regrade(rows: Sequence[dict]) -> list[dict]:
    """The rows with `extracted` and `correct` recomputed by the current graders (each row's own format);
    token_accuracy (it needs the tokenizer) is kept as written."""
    out = []
    for row in rows:
        extracted, correct = grade(row["format"], row["output"], row["gold"])
        out.append({**row, "extracted": extracted, "correct": correct})
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_bench_results(out_dir: str | Path, rows: Sequence[dict], result: dict, text: str) -> dict:
    """A benchmark's outputs under one RunLock: predictions.jsonl (`rows`, re-gradable with --predictions),
    results.json (`result`) and results.md (`text`, also printed); returns `result`."""
    out_dir = Path(out_dir)
    with RunLock(out_dir):
        write_jsonl(out_dir / "predictions.jsonl", rows)
        write_text(out_dir / "results.json", json.dumps(result, indent=2) + "\n")
        write_text(out_dir / "results.md", text)
    print(text)
    print(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'predictions.jsonl'}")
    return result


def read_predictions(path: str | Path) -> list[dict]:
    """The rows of a predictions.jsonl; a malformed line is a ValueError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no predictions file at {path}; pass the predictions.jsonl an earlier "
                                "eval_gsm_math.py run wrote")
    rows = []
    for where, row in json_records(path):
        missing = [k for k in PREDICTION_KEYS if k not in row]
        if missing:
            raise ValueError(f"{path}, {where} lacks {missing}; pass a predictions.jsonl written by eval_gsm_math.py")
        if row["format"] not in FORMATS:
            raise ValueError(f"{path}, {where} has format {row['format']!r}; a row's format is one of {FORMATS}")
        bad = [k for k in ("output", "gold", "source") if not isinstance(row[k], str)]
        if bad:
            raise ValueError(f"{path}, {where}: {bad} must be strings; the row was edited by hand or not written by "
                             "eval_gsm_math.py")
        if isinstance(row["seconds"], bool) or not isinstance(row["seconds"], (int, float)):
            raise ValueError(f"{path}, {where}: seconds must be a number, got {row['seconds']!r}")
        for key in COST_KEYS:  # optional: older files lack them
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{path}, {where}: {key} must be a number >= 0 (or absent), got {value!r}")
        value = row.get(TOKEN_ACCURACY)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 1):
            raise ValueError(f"{path}, {where}: {TOKEN_ACCURACY} must be a number in [0, 1] (or absent), got "
                             f"{value!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no predictions; pass the predictions.jsonl of a finished run")
    return rows


def write_summary(out_dir: Path, summary: dict, prefix: str = "") -> None:
    write_text(out_dir / f"{prefix}summary.json", json.dumps(summary, indent=2) + "\n")
    write_text(out_dir / f"{prefix}summary.md", markdown_table(summary) + "\n")


# ---------------------------------------------------------------- command line


def add_eval_sampler_args(p: argparse.ArgumentParser, sources: Sequence[str] = DEFAULT_SOURCES,
                          defaults: Optional[dict] = None, exclude: Sequence[str] = ()) -> None:
    """The sampler flags of the evaluators: SamplerSettings' (remedi_patches.sampling; lengths None = from the
    model's window) with --confidence_sources in place of --confidence_source, plus --eos_gating, --chat and
    --seed."""
    p.set_defaults(default_sources=tuple(sources))
    group = p.add_argument_group("sampler")
    group.add_argument("--confidence_sources", nargs="+", default=None,
                       help=f"sources compared under the same settings: NAME, NAME{NOREMASK} or {UPSTREAM}; None = "
                            f"{' '.join(sources)} (without a UPS, i.e. no --ups_head and no UPS stream of its own: "
                            "the same without 'ups')")
    add_sampler_args(p, defaults={**EVAL_DEFAULTS, **(defaults or {})},
                     exclude=("confidence_source", *exclude))
    group.add_argument("--eos_gating", action="store_true", help="= --logits_eos_inf --confidence_eos_eot_inf")
    group.add_argument("--chat", choices=CHAT_CHOICES, default="auto", help=CHAT_HELP)
    group.add_argument("--seed", type=int, default=0, help="torch.manual_seed before each source")


BEFORE_LOAD = "before load"


def has_ups(em: EvalModel) -> bool:
    """Whether the loaded bundle gives UPS confidences: a UPS head (--ups_head) or the model's own UPS stream."""
    return em.ups_head is not None or has_ups_stream(em.model)


def runs_and_settings(args: argparse.Namespace, window: Optional[int] | str = BEFORE_LOAD,
                      ups: Optional[bool] = None, **overrides) -> tuple[list[Run], Optional[SamplerSettings]]:
    """The parsed --confidence_sources (None: the defaults, 'ups' only when the model has a UPS) and the common
    SamplerSettings (ups_temperature lives in the 'ups' runs), lengths left None from `window` (the loaded model's,
    None = unlimited), checked (ValueError names the flag). Before the model is loaded (window BEFORE_LOAD) the
    flags are checked and settings is None. ups: whether the loaded model has a UPS (`has_ups`); None = not known
    yet (before loading: --ups_head decides the defaults, and 'ups' without it is checked after loading, since the
    model may carry its own UPS stream)."""
    known = args.ups_head_path is not None if ups is None else ups
    sources = args.confidence_sources
    if sources is None:
        sources = [s for s in getattr(args, "default_sources", DEFAULT_SOURCES) if s != "ups" or known]
    runs = parse_runs(sources, no_remask=args.remask is False, ups_temperature=args.ups_temperature)
    overrides = {"remask": None, "ups_temperature": 0.0, **overrides}
    if window == BEFORE_LOAD:
        check_sampler_args(args, **overrides)
        settings = None
    else:
        settings = settings_from_args(args, window, **overrides)
    if any(r.source == "ups" for r in runs) and ups is False:
        raise ValueError("source 'ups' needs a UPS: pass --ups_head (a head written by train_remedi.py), use a model "
                         "with its own UPS stream (a dual-stream RemeDi), or drop 'ups' from --confidence_sources")
    return runs, settings


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="GSM8K / MATH accuracy per confidence source (RemeDi vs baselines).")
    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="embedded",
                   help="hub name (openai/gsm8k), local .json/.jsonl/.parquet file or folder, or 'embedded'")
    d.add_argument("--subset", default=None, help="hub config / sub-folder, e.g. main for openai/gsm8k")
    d.add_argument("--split", default="test", help="dataset split (embedded: train / val / test)")
    d.add_argument("--format", choices=FORMATS, default="gsm8k", help="grader: `#### N` / last number, or \\boxed{}")
    d.add_argument("--max_samples", type=int, default=50, help="first N problems (0 = all)")
    d.add_argument("--prompt_field", default=None, help="question field (default: found as in training)")
    d.add_argument("--answer_field", default=None, help="reference field (default: answer / solution)")
    d.add_argument("--prompt_template", default=None, help=TEMPLATE_HELP + " (math: the question carries a request to "
                   "box the answer)")
    add_eval_sampler_args(p)
    r = p.add_argument_group("run")
    r.add_argument("--infer_bs", type=int, default=16, help="prompts per sampler call (sorted by length, left-padded)")
    r.add_argument("--out_dir", default=None,
                   help="where outputs go; None = out/eval_gsm_math (re-grading: the predictions file's folder)")
    r.add_argument("--predictions", default=None,
                   help="re-grade this predictions.jsonl instead of sampling (no model); writes regraded_* files")
    r.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    return p


def check_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out_dir {out_dir} is a file; pass a folder (it is created if missing)")
    return out_dir


def run_regrade(path: str, out_dir: Optional[str]) -> dict:
    target = check_out_dir(Path(out_dir) if out_dir else Path(path).parent)
    rows = read_predictions(path)
    new_rows = regrade(rows)
    changed = sum(a["correct"] != b["correct"] for a, b in zip(rows, new_rows))
    summary = summarise(new_rows)
    with RunLock(target):
        write_jsonl(target / "regraded_predictions.jsonl", new_rows)
        write_summary(target, {**summary, "regraded_from": str(path), "changed": changed}, prefix="regraded_")
    print(markdown_table(summary))
    print(f"\n{changed} of {len(rows)} verdicts changed; wrote {target / 'regraded_predictions.jsonl'}")
    return summary


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.predictions:
        return run_regrade(args.predictions, args.out_dir)
    if args.max_samples < 0:
        raise ValueError(f"--max_samples must be >= 0 (0 = all), got {args.max_samples}")
    if args.infer_bs < 1:
        raise ValueError(f"--infer_bs must be >= 1, got {args.infer_bs}")
    runs_and_settings(args)  # every flag checked before loading
    spec = model_spec_from_args(args)
    out_dir = check_out_dir(Path(args.out_dir or "out/eval_gsm_math"))
    with RunLock(out_dir):
        records = load_records(args.dataset, args.split, args.subset, limit=args.max_samples or None)
        items = make_items(records, args.format, args.prompt_template, args.prompt_field, args.answer_field)
        em = spec.load()
        runs, settings = runs_and_settings(args, max_length_of(em.model), has_ups(em))  # lengths from the window
        rows, summary = evaluate(em, items, runs, settings, fmt=args.format, batch_size=args.infer_bs,
                                 seed=args.seed, chat=args.chat, progress=not args.no_progress)
        write_jsonl(out_dir / "predictions.jsonl", rows)
        used = {k: getattr(settings, k) for k in (*EVAL_DEFAULTS, *FAST_DECODING_FIELDS)
                if getattr(settings, k) is not None}
        write_summary(out_dir, {**summary, "settings": {**vars(args), "confidence_sources": [r.label for r in runs],
                                                         **used}})
    print(markdown_table(summary))
    print(f"\nwrote {out_dir / 'predictions.jsonl'} and {out_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    run_main(main)
