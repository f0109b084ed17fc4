"""`import remedi_patches` is enough for transformers' Auto classes to load a LLaDA or RemeDi folder, whatever the
import order, without importing transformers itself (that would cost every entry point seconds before its flag
checks)."""
import subprocess
import sys

import pytest
import torch

from remedi_patches.llada import LLaDAConfig, LLaDAModelLM, RemeDiConfig, RemeDiUPMModelLM

ORDERS = {
    "package first": "import remedi_patches\nfrom transformers import AutoModel",
    # the Auto modules are first imported inside transformers' own import chain (modeling_utils)
    "mid-chain": "import remedi_patches\nfrom transformers import PreTrainedModel, AutoTokenizer\n"
                 "from transformers.models.auto.modeling_auto import AutoModel",
}


SIZES = dict(d_model=32, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=100, embedding_size=100)


@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory):
    """A LLaDA folder and a dual-stream RemeDi folder (our save: model_type "RemeDi")."""
    folder = tmp_path_factory.mktemp("llada")
    torch.manual_seed(0)
    LLaDAModelLM(LLaDAConfig(**SIZES)).save_pretrained(folder / "llada")
    RemeDiUPMModelLM(RemeDiConfig(**SIZES, ups_positions=[0, 1])).save_pretrained(folder / "remedi")
    return folder


@pytest.mark.slow  # one python (with transformers) per import order
@pytest.mark.parametrize("order", list(ORDERS))
def test_auto_classes_load_a_llada_folder_after_import_remedi_patches(order, llada_folder):
    llada, remedi = str(llada_folder / "llada"), str(llada_folder / "remedi")
    code = (f"import sys\n{ORDERS[order]}\n"
            f"from transformers import AutoConfig, AutoModelForCausalLM\n"
            f"assert type(AutoConfig.from_pretrained({llada!r})).__name__ == 'LLaDAConfig'\n"
            f"assert type(AutoConfig.from_pretrained({remedi!r})).__name__ == 'RemeDiConfig'\n"
            f"for auto in (AutoModel, AutoModelForCausalLM):\n"
            f"    assert type(auto.from_pretrained({llada!r})).__name__ == 'LLaDAModelLM'\n"
            f"    assert type(auto.from_pretrained({remedi!r})).__name__ == 'RemeDiUPMModelLM'\n"
            f"assert not any('Transformers' in type(f).__name__ for f in sys.meta_path)  # the watcher is gone\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not register" not in result.stderr


def test_import_remedi_patches_stays_light():
    code = "import sys, remedi_patches; assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
