"""Tiny models and data for the evaluation tests (test_eval_tools, test_opencompass_adapter, test_lm_eval_model,
test_trajectory_views, test_detection, test_sampler_cli).

`tiny_smdm_dir` writes a 2-layer SMDM TransEncoder export with an embedded-style sentencepiece tokenizer and a random
UPS head (the `tiny` fixture of conftest.py). `tiny_llada_dir` writes a native LLaDA (remedi_patches.llada) of 2
layers, width 32, with a word-level tokenizer built from the first GSM8K problems and a Llama-3-shaped chat template,
to a folder that load_backbone() reads like a real LLaDA checkpoint folder (with ups_positions: a dual-stream RemeDi).
`tiny_ups_head` saves a random UPS head for it.
`reference_answer` decodes one prompt with generate() directly: what the adapters must return.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from lit_gpt.config import Config
from lit_gpt.model import TransEncoder, save_smdm_folder
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from remedi_patches.backbones import load_backbone
from remedi_patches.embedded.task import format_prompt, make_split
from remedi_patches.embedded.tokenizer import train_tokenizer
from remedi_patches.llada import LLaDAConfig, LLaDAModelLM, RemeDiConfig, RemeDiUPMModelLM
from remedi_patches.modeling_wrappers import load_ups_head, save_ups_head
from remedi_patches.sampling import generate
from remedi_patches.ups_head import UPSHead

SPECIALS = ["<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "[UNK]"]
CHAT_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|> {{ m['content'] }}"
                 "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
                 "{% endif %}")
HIDDEN = 32  # the tiny LLaDA
SMDM_HIDDEN = 32  # the tiny SMDM


def read_jsonl(path: Path, n: int) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def word_vocab(texts: list[str]) -> list[str]:
    words = set("0123456789") | {"user", "assistant", "system", "Question", "Answer", ":", "####"}
    for text in texts:
        words.update(re.findall(r"[A-Za-z]+|[^\sA-Za-z0-9]+", text))
    return SPECIALS + sorted(words - set(SPECIALS))


def tiny_tokenizer(texts: list[str]):
    vocab = {w: i for i, w in enumerate(word_vocab(texts))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                      unk_token="[UNK]", additional_special_tokens=SPECIALS[1:5])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_llada_dir(root: Path, data_dir: Path, seed: int = 0, ups_positions: list[int] | None = None) -> Path:
    """A 2-layer native LLaDA + word-level tokenizer (vocab from 40 GSM8K problems) saved to root/tiny_llada; with
    `ups_positions` a dual-stream RemeDi (UPS blocks after those layers, live feedback) saved to root/tiny_remedi."""
    rows = read_jsonl(data_dir / "gsm8k" / "test.jsonl", 20) + read_jsonl(data_dir / "gsm8k" / "train.jsonl", 20)
    tokenizer = tiny_tokenizer([r["question"] + " " + r["answer"] for r in rows])
    vocab = len(tokenizer)
    sizes = dict(d_model=HIDDEN, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=vocab,
                 embedding_size=vocab, max_sequence_length=4096, rope_theta=10000.0,
                 mask_token_id=tokenizer.convert_tokens_to_ids("<|mdm_mask|>"),
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if ups_positions is None:
        model, out = LLaDAModelLM(LLaDAConfig(**sizes)).eval(), root / "tiny_llada"
    else:
        model = RemeDiUPMModelLM(RemeDiConfig(**sizes, ups_positions=ups_positions)).eval()
        out = root / "tiny_remedi"
    with torch.no_grad():  # large random weights: predictions depend strongly on context, so decoding order matters
        for name, weight in model.named_parameters():
            if weight.dim() == 2:
                weight.normal_(std=1.0 if "wte" in name else 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_ups_head(root: Path, seed: int = 1) -> Path:
    """A random (width 0) UPS head for the tiny LLaDA, saved with save_ups_head."""
    torch.manual_seed(seed)
    head = UPSHead(HIDDEN, 0)
    torch.nn.init.normal_(head.net[0].weight, std=1.0)
    return save_ups_head(root / "ups_head.safetensors", head, {"backbone": "tiny_llada"})


def tiny_smdm_dir(root: Path, data_dir: Path) -> Path:
    """A 2-layer TransEncoder (width 32; 400 logits, mask id 400, like the embedded model) + a 400-piece
    embedded-style tokenizer in root/tiny_smdm, and a random linear UPS head at root/tiny_smdm/ups_head.safetensors."""
    texts = [r["question"] + " " + r["answer"] for r in read_jsonl(data_dir / "gsm8k" / "train.jsonl", 100)]
    texts += [r["problem"] + " " + r["solution"] for r in read_jsonl(data_dir / "math500" / "test.jsonl", 10)]
    texts += [format_prompt(p.question) + " " + p.solution for p in make_split(100, 0, "train")]
    out = root / "tiny_smdm"
    tokenizer = train_tokenizer(texts, out, vocab_size=400, seed=0)
    torch.manual_seed(0)
    config = Config.from_name("Diff_LLaMA_tiny", vocab_size=len(tokenizer), padding_multiple=1, n_embd=SMDM_HIDDEN,
                              n_head=2, intermediate_size=64, block_size=1024)  # as the embedded model: no padded rows
    save_smdm_folder(TransEncoder(config), out)
    head = UPSHead(SMDM_HIDDEN, 0)
    torch.nn.init.normal_(head.net[0].weight, std=1.0)
    save_ups_head(out / "ups_head.safetensors", head, {"mask_id": config.mask_id, "backbone": "tiny_smdm"})
    return out


def reference_answer(model_dir: Path, prompt_ids: list[int], sampler: dict, confidence_source=None,
                     ups_head=None, decode=generate) -> str:
    """`decode` (generate, or block_decoding.block_generate) on one prompt (no adapter code), answer cut at EOS / EoT
    and decoded without special tokens."""
    bb = load_backbone(str(model_dir))
    head = load_ups_head(ups_head)[0] if ups_head else None
    out = decode(bb.model, torch.tensor([prompt_ids]), **sampler, mask_id=bb.mask_id,
                 confidence_source=confidence_source, ups_head=head, eos_id=bb.eos_id,
                 eot_id=bb.eot_id)[0, len(prompt_ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in (bb.eos_id, bb.eot_id)), len(out))
    return bb.tokenizer.decode(out[:cut], skip_special_tokens=True)
