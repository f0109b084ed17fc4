"""remedi_patches.backbones.load_backbone: one loader for every source, with the special ids the sampler needs."""
import shutil

import pytest
import torch

from lit_gpt.model import TransEncoder, save_smdm_folder
from remedi_patches.backbones import EMBEDDED_DIR, LLADA_MASK_ID, load_backbone
from remedi_patches.embedded import TOKENIZER_DIR
from remedi_patches.llada import LLaDAConfig, LLaDAModelLM


def _with_tokenizer(folder):
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy2(f, folder / f.name)
    return folder


def test_embedded_default_is_the_shipped_smdm_model():
    bb = load_backbone(None)
    assert bb.kind == "smdm" and bb.mask_id == len(bb.tokenizer) == 512
    assert bb.eos_id == bb.tokenizer.eos_token_id and bb.eot_id is None
    assert not bb.model.training
    assert load_backbone("embedded").name == str(EMBEDDED_DIR)


def test_llada_folder(tmp_path):
    torch.manual_seed(0)
    config = LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=64, vocab_size=600,
                         embedding_size=600, max_sequence_length=64)
    LLaDAModelLM(config).save_pretrained(tmp_path)
    bb = load_backbone(_with_tokenizer(tmp_path), dtype="bfloat16")
    assert bb.kind == "llada" and isinstance(bb.model, LLaDAModelLM)
    assert bb.mask_id == LLADA_MASK_ID and next(bb.model.parameters()).dtype == torch.bfloat16


def test_smdm_export_and_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TransEncoder.from_name("Diff_LLaMA_tiny", vocab_size=512, block_size=64)
    folder = _with_tokenizer(save_smdm_folder(model, tmp_path / "export"))
    x = torch.randint(0, 512, (1, 8))
    bb = load_backbone(folder)
    assert bb.kind == "smdm" and bb.mask_id == 512
    torch.testing.assert_close(bb.model(x), model.eval()(x))

    ckpt = tmp_path / "iter-000010-ckpt.pth"
    torch.save({"model": model.state_dict(), "iter_num": 10, "hparams": {"vocab_size": 512}}, ckpt)  # as train_mdm
    bb = load_backbone(ckpt, smdm_size="Diff_LLaMA_tiny", tokenizer=TOKENIZER_DIR)
    assert bb.mask_id == 512
    torch.testing.assert_close(bb.model(x), model(x))
    with pytest.raises(ValueError, match="--smdm_size"):
        load_backbone(ckpt, tokenizer=TOKENIZER_DIR)
    with pytest.raises(ValueError, match="--tokenizer"):
        load_backbone(ckpt, smdm_size="Diff_LLaMA_tiny")


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local path"):
        load_backbone("no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a transformers model folder"):
        load_backbone(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_backbone(None, dtype="float8")
