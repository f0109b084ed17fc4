"""LLaDA SFT (SMDM/sft/train_sft.py --model_name <LLaDA folder>): the loss equals a direct computation, the prompt
stays clean, LoRA and full fine-tuning export what the project's loaders read, a killed run resumes on the same
losses, bad combinations are one-line errors. The model is the 2-layer native LLaDA of eval_fixtures."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lit_gpt.diffusion import draw_noise, seeded_generator
from lit_gpt.packed_dataset import SampleOrder
from remedi_patches.backbones import load_backbone, load_eval_model
from remedi_patches.llada import LLaDAModelLM
from remedi_patches.llada.modeling_llada import LLaDARMSNorm

from cli_helpers import in_process_user_error
from eval_fixtures import read_jsonl, tiny_llada_dir
from trainer_helpers import killed_after_first_save, train_sft

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 40
EPS = 1e-3
SEED = 3407  # the trainer's default --seed


@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory, data_dir) -> Path:
    return tiny_llada_dir(tmp_path_factory.mktemp("sft_llada"), data_dir)


@pytest.fixture(scope="module")
def turns(data_dir) -> list[tuple[str, str]]:
    """(question, answer) of 20 GSM8K problems, cut to 4..12 / 8 words: prompts of several lengths."""
    rows = read_jsonl(data_dir / "gsm8k" / "train.jsonl", 20)
    return [(" ".join(r["question"].split()[:4 + i % 9]), " ".join(r["answer"].split()[:8]))
            for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, turns) -> Path:
    """The training README's conversations format."""
    path = tmp_path_factory.mktemp("sft_llada_data") / "chat.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in turns))
    return path


def llada_args(model: Path, data: Path, out_dir: Path, **kw) -> list[str]:
    flags = dict(model_name=model, dataset=data, chat_template=True, seq_len=SEQ_LEN, micro_batch_size=4,
                 global_batch_size=8, max_steps=2, warmup_steps=1, lr=1e-3, min_lr=1e-4, save_interval=2,
                 out_dir=out_dir, accelerator="cpu")
    flags.update(kw)
    return [x for k, v in flags.items() if v is not None for x in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]


class Inputs:
    """The ids every LLaDAModelLM forward gets (under PEFT and Fabric too) and the model that ran them."""

    def __init__(self, monkeypatch):
        self.ids, self.models = [], []
        real = LLaDAModelLM.forward

        def forward(model, input_ids=None, *args, **kwargs):
            self.ids.append(input_ids.detach().clone())
            self.models.append(model)
            return real(model, input_ids, *args, **kwargs)

        monkeypatch.setattr(LLaDAModelLM, "forward", forward)


def clean_rows(tokenizer, turns, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (b, SEQ_LEN), prompt lengths (b,)) rendered by hand with the tiny model's chat template: the user turn and
    the assistant header, then the reply and its <|eot_id|>, then EOS padding."""
    rows, plens = [], []
    for i in indices:
        q, a = turns[i]
        prompt = tokenizer(f"<|start_header_id|>user<|end_header_id|> {q}<|eot_id|><|start_header_id|>assistant"
                           "<|end_header_id|>", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" {a}<|eot_id|>", add_special_tokens=False)["input_ids"]
        row = (prompt + answer)[:SEQ_LEN]
        rows.append(row + [tokenizer.eos_token_id] * (SEQ_LEN - len(row)))
        plens.append(len(prompt))
    return torch.tensor(rows), torch.tensor(plens)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def test_llada_sft_loss_equals_the_direct_computation(tiny_llada, chat_data, turns, tmp_path, monkeypatch):
    spy = Inputs(monkeypatch)
    losses = train_sft.main(llada_args(tiny_llada, chat_data, tmp_path, max_steps=1, micro_batch_size=8))
    bb = load_backbone(tiny_llada)
    ids, plen = clean_rows(bb.tokenizer, turns, SampleOrder(len(turns), SEED).indices(0, 8))
    draw = draw_noise(seeded_generator(SEED, train_sft.STREAM_TRAIN, 0), 8, SEQ_LEN)
    p_mask = (1 - EPS) * draw.t + EPS  # (b,)
    answer = torch.arange(SEQ_LEN)[None] >= plen[:, None]
    masked = (draw.u < p_mask[:, None]) & answer
    noisy = torch.where(masked, bb.mask_id, ids)
    assert len(spy.ids) == 1 and torch.equal(spy.ids[0], noisy)
    ce = F.cross_entropy(logits(bb.model, noisy).transpose(1, 2), ids, reduction="none")  # (b, L)
    expected = ((ce * masked / p_mask[:, None]).sum(1) / (SEQ_LEN - plen)).mean()
    assert masked.sum() > 0 and losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_llada_sft_keeps_the_prompt_clean(tiny_llada, chat_data, turns, tmp_path, monkeypatch):
    """LoRA run of 3 steps of 2 micro-batches: every row fed to the model is a clean row whose prompt is untouched
    and whose answer (reply + EOS padding) is partly [MASK]."""
    spy = Inputs(monkeypatch)
    train_sft.main(llada_args(tiny_llada, chat_data, tmp_path, max_steps=3, lora_r=4))
    tok = load_backbone(tiny_llada).tokenizer
    mask_id = tok.convert_tokens_to_ids("<|mdm_mask|>")
    clean, plen = clean_rows(tok, turns, list(range(len(turns))))
    by_prompt = {tuple(row[:n].tolist()): (row, n) for row, n in zip(clean, plen)}
    assert len(spy.ids) == 3 * 2
    answer_masks = 0
    for batch in spy.ids:
        for row in batch:
            match = [v for k, v in by_prompt.items() if tuple(row[:len(k)].tolist()) == k]
            assert len(match) == 1, "a prompt was noised"
            truth, n = match[0]
            masked = row == mask_id
            assert not masked[:n].any() and torch.equal(row[~masked], truth[~masked])
            answer_masks += int(masked.sum())
    assert answer_masks > 0


def test_llada_lora_leaves_the_base_and_exports_a_loadable_adapter(tiny_llada, chat_data, tmp_path, monkeypatch):
    spy = Inputs(monkeypatch)
    train_sft.main(llada_args(tiny_llada, chat_data, tmp_path, max_steps=3, lora_r=4))
    trained = spy.models[-1]  # the LLaDAModelLM inside PEFT: base weights as base_layer, the adapter as lora_*
    base = load_backbone(tiny_llada).model
    kept = {k.replace("base_layer.", ""): v for k, v in trained.state_dict().items() if "lora_" not in k}
    assert kept.keys() == base.state_dict().keys()
    assert all(torch.equal(kept[k], v) for k, v in base.state_dict().items())
    adapter = tmp_path / "final"
    assert (adapter / "adapter_config.json").is_file()
    loaded = load_eval_model(str(tiny_llada), lora_path=str(adapter), device="cpu", dtype=None)
    ids = torch.randint(0, 40, (2, 12))
    assert torch.allclose(logits(loaded.model, ids), logits(trained, ids), atol=1e-5)
    assert not torch.allclose(logits(loaded.model, ids), logits(base, ids), atol=1e-3)


def test_llada_full_fine_tuning_exports_the_trained_model(tiny_llada, chat_data, tmp_path, monkeypatch):
    spy = Inputs(monkeypatch)
    train_sft.main(llada_args(tiny_llada, chat_data, tmp_path, max_steps=3))
    trained, export = spy.models[-1], load_backbone(tmp_path / "final")
    ids = torch.randint(0, 40, (2, 12))
    assert export.kind == "llada" and export.tokenizer.get_vocab() == load_backbone(tiny_llada).tokenizer.get_vocab()
    assert torch.allclose(logits(export.model, ids), logits(trained, ids), atol=1e-5)
    assert not torch.allclose(logits(export.model, ids), logits(load_backbone(tiny_llada).model, ids), atol=1e-3)


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_killed_llada_sft_resumes_on_the_same_losses(tiny_llada, chat_data, tmp_path, lora):
    args = dict(max_steps=4, lora_r=lora)
    full = train_sft.main(llada_args(tiny_llada, chat_data, tmp_path / "full", **args))
    killed_after_first_save(lambda: train_sft.main(llada_args(tiny_llada, chat_data, tmp_path / "killed", **args)))
    assert train_sft.main(llada_args(tiny_llada, chat_data, tmp_path / "killed", **args)) == full[2:]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    assert (tmp_path / "killed" / "final" / name).read_bytes() == (tmp_path / "full" / "final" / name).read_bytes()


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_every_block_with_the_same_losses(tiny_llada, chat_data, tmp_path,
                                                                           monkeypatch, lora):
    """Norm runs counted (two per block, one final): the blocks run again in backward, the losses do not move."""
    runs = []
    real = LLaDARMSNorm.forward
    monkeypatch.setattr(LLaDARMSNorm, "forward", lambda norm, x: runs.append(1) or real(norm, x))
    plain = train_sft.main(llada_args(tiny_llada, chat_data, tmp_path / "plain", lora_r=lora))
    micro_batches, per_forward, per_recompute = 2 * 2, 2 * 2 + 1, 2 * 2
    assert len(runs) == micro_batches * per_forward
    ckpt = train_sft.main(llada_args(tiny_llada, chat_data, tmp_path / "ckpt", lora_r=lora,
                                     gradient_checkpointing=True))
    assert len(runs) == micro_batches * (2 * per_forward + per_recompute)
    torch.testing.assert_close(ckpt, plain)


def test_bad_llada_combinations_are_one_line_errors(tiny_llada, chat_data, tmp_path, capsys, data_dir):
    smdm = ["--model_name", "Diff_LLaMA_tiny", "--vocab_size", "64", "--tokenizer", str(tiny_llada)]
    remedi = tiny_llada_dir(tmp_path, data_dir, ups_positions=[0])
    cases = [
        (["--pretrained_path", str(tiny_llada)], "drop --pretrained_path"),
        (["--lora_alpha", "8"], "add --lora_r"),
        (["--lora_r", "4", "--lora_target", "nope"], "--lora_target 'nope' matches no module"),
        (["--seq_len", "5000"], "exceeds the context 4096"),
        (smdm + ["--lora_r", "4"], "--lora_r: LoRA here trains a LLaDA --model_name"),
        (["--model_name", "Diff_LLaMA_17M"], "neither an SMDM config"),
        (["--model_name", str(remedi)], "dual-stream RemeDi"),
    ]
    for extra, message in cases:
        argv = llada_args(tiny_llada, chat_data, tmp_path / "out", **{"chat_template": None}) + extra
        assert message in in_process_user_error(train_sft.main, argv, capsys)
    assert not (tmp_path / "out" / "final").exists()


def test_llada_defaults_are_the_seeds_and_smdm_defaults_stay(tiny_llada, chat_data):
    llada = train_sft.parse_args(["--model_name", str(tiny_llada), "--dataset", str(chat_data), "--devices", "2"])
    assert (llada.lr, llada.max_steps, llada.micro_batch_size, llada.global_batch_size) == (2e-5, 10000, 4, 8)
    assert llada.lora_r is None and llada.epochs == 3
    lora = train_sft.parse_args(["--model_name", str(tiny_llada), "--dataset", str(chat_data), "--epochs", "2",
                                 "--lora_r", "8"])
    assert lora.max_steps is None and lora.epochs == 2  # --epochs sets the length
    assert (lora.lora_alpha, lora.lora_dropout, lora.lora_target) == (16, 0.05, "auto")
    smdm = train_sft.parse_args(["--dataset", str(chat_data)])
    assert (smdm.lr, smdm.max_steps, smdm.global_batch_size, smdm.epochs) == (2e-4, None, 256, 3)


def test_fsdp_wraps_the_llada_blocks(tiny_llada, chat_data, tmp_path, monkeypatch):
    """No GPU here: the strategy setup_fabric builds is checked, not run."""
    from remedi_patches.llada import LLaDABlock

    seen = {}

    def setup_fabric(cfg, wrap_blocks=None, loggers=None):
        seen["wrap_blocks"] = wrap_blocks
        raise KeyboardInterrupt

    monkeypatch.setattr(train_sft, "setup_fabric", setup_fabric)
    with pytest.raises(KeyboardInterrupt):
        train_sft.main(llada_args(tiny_llada, chat_data, tmp_path, accelerator="gpu", strategy="fsdp"))
    assert seen["wrap_blocks"] == {LLaDABlock}


def test_adapter_export_reads_an_fsdp_checkpoint(tiny_llada, tmp_path):
    """Under FSDP a LoRA checkpoint holds the whole model's full state dict: the export takes its adapter."""
    from peft import LoraConfig, get_peft_model

    bb = load_backbone(tiny_llada)
    peft_model = get_peft_model(bb.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trained = {k: torch.randn_like(v) if "lora_" in k else v for k, v in peft_model.state_dict().items()}
    torch.save({"model": trained}, tmp_path / "iter-000004-ckpt.pth")
    rank_zero = SimpleNamespace(global_rank=0, print=lambda *a, **kw: None, barrier=lambda: None)  # Fabric's rank 0
    train_sft.export_adapter(rank_zero, tmp_path, peft_model, bb.tokenizer, tmp_path / "final")
    loaded = load_eval_model(str(tiny_llada), lora_path=str(tmp_path / "final"), device="cpu", dtype=None).model
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert got.keys() == {k for k in trained if "lora_" in k}
    assert all(torch.equal(v, trained[k]) for k, v in got.items())
