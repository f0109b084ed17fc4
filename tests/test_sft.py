"""Diffusion SFT (SMDM/sft/train_sft.py): clean prompt, answer-length normalisation, data layouts, resume."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_gpt.config import Config
from lit_gpt.diffusion import draw_noise, seeded_generator
from lit_gpt.model import TransEncoder, load_smdm_folder, save_smdm_folder

from trainer_helpers import killed_after_first_save, make_char_tokenizer, train_sft

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
SEQ_LEN = 16
PROMPT_LEN = 7  # "ab+cd=" + "\n"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    make_char_tokenizer(folder, chat_template=True)
    return folder


def addition_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    return [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in addition_records(64)) + "\n")
    return path


def sft_args(data: Path, tok: Path, out_dir: Path, **kw) -> list[str]:
    flags = dict(model_name="Diff_LLaMA_tiny", vocab_size=VOCAB, tokenizer=tok, dataset=data, seq_len=SEQ_LEN,
                 micro_batch_size=4, global_batch_size=8, max_steps=4, warmup_steps=2, lr=3e-3, min_lr=3e-4,
                 save_interval=2, out_dir=out_dir, accelerator="cpu", prompt_template="{question}\n")
    flags.update(kw)
    return [x for k, v in flags.items() if v is not None for x in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]


class Spy:
    """Records what the trainer feeds the model and the loss."""

    def __init__(self, monkeypatch):
        self.inputs, self.loss_args = [], []
        real_forward, real_loss = TransEncoder.forward, train_sft.tps_loss

        def forward(model, idx, attention_mask=None):
            self.inputs.append(idx.detach().clone())
            return real_forward(model, idx, attention_mask)

        def loss(logits, targets, masked, p_mask, answer_len):
            self.loss_args.append((targets.clone(), masked.clone(), answer_len.clone()))
            return real_loss(logits, targets, masked, p_mask, answer_len)

        monkeypatch.setattr(TransEncoder, "forward", forward)
        monkeypatch.setattr(train_sft, "tps_loss", loss)


def test_sft_noise_keeps_prompt_clean_and_masks_answer_at_p_mask():
    b, l = 4000, 12
    ids = torch.randint(0, 50, (b, l))
    prompt_len = torch.randint(0, l, (b,))
    draw = draw_noise(seeded_generator(0, 0, 0), b, l)
    noisy, masked, p_mask = train_sft.sft_noise(ids, prompt_len, draw.t, draw.u, mask_id=63, eps=1e-3)
    prompt = torch.arange(l)[None] < prompt_len[:, None]
    assert not masked[prompt].any() and torch.equal(noisy[prompt], ids[prompt])
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], 63)) and torch.equal(noisy[~masked], ids[~masked])
    assert abs(masked[~prompt].float().mean().item() - p_mask[~prompt].mean().item()) < 0.01


def test_sft_loss_is_normalised_by_answer_length():
    """LLaDA SFT: sum_{b, i masked} CE / p_mask / answer_len_b, divided by the batch size."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    masked = torch.tensor([[False, False, True, False, True], [False, True, True, True, False]])
    p_mask = torch.tensor([[0.4] * 5, [0.8] * 5])
    answer_len = torch.tensor([3, 4])
    expected = 0.0
    for b in range(2):
        for i in range(5):
            if masked[b, i]:
                ce = -torch.log_softmax(logits[b, i], -1)[targets[b, i]].item()
                expected += ce / p_mask[b, i].item() / answer_len[b].item()
    loss = train_sft.tps_loss(logits, targets, masked, p_mask, answer_len)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)


def test_trainer_never_noises_the_prompt_and_counts_eos_padding_as_answer(pair_data, tokenizer_dir, tmp_path,
                                                                          monkeypatch):
    spy = Spy(monkeypatch)
    train_sft.main(sft_args(pair_data, tokenizer_dir, tmp_path, max_steps=3))
    tok = make_char_tokenizer(tmp_path / "tok")
    assert len(spy.inputs) == 3 * 2 and all(x.shape == (4, SEQ_LEN) for x in spy.inputs)
    clean_prompts = {tuple(tok(f"{r['question']}\n")["input_ids"]) for r in addition_records(64)}
    for noisy, (targets, masked, answer_len) in zip(spy.inputs, spy.loss_args):
        assert not (noisy[:, :PROMPT_LEN] == VOCAB).any() and not masked[:, :PROMPT_LEN].any()
        assert {tuple(row) for row in noisy[:, :PROMPT_LEN].tolist()} <= clean_prompts
        assert torch.equal(noisy[~masked], targets[~masked]) and (noisy[masked] == VOCAB).all()
        assert (answer_len == SEQ_LEN - PROMPT_LEN).all()  # answer + EOS padding
        assert (targets[:, -1] == tok.eos_token_id).all()
    assert sum(int(m.sum()) for _, m, _ in spy.loss_args) > 0


def test_sft_loss_falls(pair_data, tokenizer_dir, tmp_path):
    losses = train_sft.main(sft_args(pair_data, tokenizer_dir, tmp_path, max_steps=50, warmup_steps=3,
                                     save_interval=100))
    assert len(losses) == 50
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    assert load_smdm_folder(tmp_path / "final").config.vocab_size == VOCAB
    from remedi_patches.backbones import load_backbone  # the export carries --tokenizer: it loads on its own

    assert load_backbone(tmp_path / "final").tokenizer.get_vocab() == train_sft_tokenizer(tokenizer_dir).get_vocab()


def train_sft_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_chat_conversations_use_the_chat_template(tokenizer_dir, tmp_path, monkeypatch):
    convs = [{"conversations": [{"from": "human", "value": r["question"]}, {"from": "gpt", "value": r["answer"]}]}
             for r in addition_records(16)]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    spy = Spy(monkeypatch)
    train_sft.main(sft_args(data, tokenizer_dir, tmp_path / "out", max_steps=1, chat_template=True))
    tok = make_char_tokenizer(tmp_path / "tok", chat_template=True)
    user, bot = tok.convert_tokens_to_ids(["<user>", "<bot>"])
    prompt_len = 1 + 6 + 1  # <user> ab+cd= <bot>
    for noisy, (targets, masked, answer_len) in zip(spy.inputs, spy.loss_args):
        assert (noisy[:, 0] == user).all() and (noisy[:, prompt_len - 1] == bot).all()
        assert not masked[:, :prompt_len].any() and (answer_len == SEQ_LEN - prompt_len).all()


def test_sft_from_pretrained_folder_and_resume(pair_data, tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    pretrained = save_smdm_folder(TransEncoder(Config.from_name("Diff_LLaMA_tiny", vocab_size=VOCAB)), tmp_path / "pre")
    args = dict(model_name=None, vocab_size=None, pretrained_path=pretrained, max_steps=4)
    full = train_sft.main(sft_args(pair_data, tokenizer_dir, tmp_path / "full", **args))
    killed_after_first_save(lambda: train_sft.main(sft_args(pair_data, tokenizer_dir, tmp_path / "killed", **args)))
    assert train_sft.main(sft_args(pair_data, tokenizer_dir, tmp_path / "killed", **args)) == full[2:]
    with pytest.raises(ValueError, match="drop --model / --model_name"):
        train_sft.main(sft_args(pair_data, tokenizer_dir, tmp_path / "x", pretrained_path=pretrained))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model.s vocabulary is 40"):
        train_sft.main(sft_args(pair_data, tokenizer_dir, tmp_path / "x", vocab_size=40))
    with pytest.raises(ValueError, match="fields present"):
        train_sft.main(sft_args(pair_data, tokenizer_dir, tmp_path / "x", prompt_field="problem"))
    assert math.isfinite(full[-1])
