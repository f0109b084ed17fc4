"""Supervised fine-tuning of a pretrained SEDD model (the fine-tuning guide's `sft.py`; Hydra overrides).

    python SMDM/sedd/sft.py sft.pretrained_model=louaaron/sedd-small sft.dataset=simplescaling/s1K-1.1
    python SMDM/sedd/sft.py sft.pretrained_model=/models/sedd-medium sft.dataset=data/s1k.jsonl \
        sft.question_field=question sft.response_field=solution sft.freeze_embeddings=True \
        optim.lr=5e-6 training.batch_size=32 training.n_iters=100000
    python SMDM/sedd/sft.py sft.pretrained_model=... sft.dataset=... sft.question_field=question \
        sft.thinking_field=gemini_thinking_trajectory sft.attempt_field=gemini_attempt
    python SMDM/sedd/sft.py ngpus=4 sft.pretrained_model=... sft.dataset=...     # Fabric devices
    python SMDM/sedd/sft.py load_dir=out/sedd_sft                                  # resume that run
    python SMDM/sedd/sft.py -m sft.pretrained_model=... optim.lr=1e-5,5e-6   # sweep: out_dir/multirun/<n>

Keys and defaults: SMDM/sedd/configs/sft.yaml. Outputs go to out_dir (default out/sedd_sft; Hydra's run folder is
the same, and Hydra writes no .hydra/ folder and no log file there): iter-XXXXXX-ckpt.pth checkpoints,
logs/version_k/metrics.csv, sft_overrides.yaml / sft_config.yaml, and model/ (the EMA weights, SEDD hub layout, with
the tokenizer). The trainer is remedi_patches/sedd/sft.py (its docstring says what a step does). A bad key or value,
a missing field, model or dataset is one `error: ...` line, exit status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from remedi_patches.cli import run_main
from remedi_patches.sedd.sft import compose_config, main, train

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="sft", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:  # each job of a sweep trains in its own folder: <out_dir>/multirun/<job number>
        overrides.append(f"out_dir={hc.runtime.output_dir}")
    run_main(lambda: train(compose_config(overrides), overrides))  # load_dir: the saved run's overrides first


def _plain_overrides(argv: list[str]) -> list[str]:
    """The config overrides of a command line (no Hydra flags, no hydra.* keys)."""
    return [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]


if __name__ == "__main__":
    argv = sys.argv[1:]
    if any(a in ("-m", "--multirun") or a.startswith("--") for a in argv):
        hydra_main()  # Hydra's own flags (multirun, --cfg, --help, ...): Hydra handles the command line
    else:
        # check every override first so that a bad key is one `error:` line (exit 2), not Hydra's report
        run_main(lambda: compose_config(_plain_overrides(argv)))
        if any(a.lstrip("+~").startswith(("hydra.", "hydra/")) for a in argv):
            hydra_main()
        else:
            run_main(main, argv)
