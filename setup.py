"""Instruct2Dream: DreamBooth-style personalization of InstructPix2Pix on the CompVis latent-diffusion codebase."""

from setuptools import find_packages, setup

# Exact pins that install together on a CPU-only machine without replacing torch (docs/environment.md):
# nothing here depends on torchvision, which would pull a multi-GB CUDA torch.
# `torch==2.13.0` also matches the CUDA builds of the same release (2.13.0+cu1xx), see environment.yaml.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "pytorch-lightning==2.6.6",
    "omegaconf==2.4.0",
    "einops==0.8.2",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "kornia==0.9.0",
    "pillow==12.3.0",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "safetensors==0.8.0",
    "ftfy==6.3.1",
    "regex==2026.11.19",
]

# Optional: scripts/convert_to_diffusers.py (`pip install -e .[convert]`) writes a diffusers folder with diffusers.
CONVERT_REQUIRES = [
    "diffusers==0.42.1",
]

# Test-only: diffusers is the reference oracle; scikit-image ships real photos usable offline; playwright drives the
# OS's Chromium (/usr/bin/chromium, Debian's package; playwright's own browser download is never used) to test the app.
TEST_REQUIRES = CONVERT_REQUIRES + [
    "scikit-image==0.26.0",
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",  # the test tier on every core (tests/run_tests.sh), one thread per worker
    "playwright==1.65.2",
]

# Optional: plots of scripts/evaluate.py (`pip install -e .[eval]`); matplotlib does not pull torchvision.
EVAL_REQUIRES = [
    "matplotlib==3.11.2",
]

# Optional, for fitting training in GPU memory (README, "Fitting in GPU memory"): LoRA adapters (peft) and 8-bit AdamW
# (bitsandbytes). Neither depends on torchvision; both run on CPU (tests) and CUDA.
MEMORY_REQUIRES = [
    "peft==0.21.2",
    "bitsandbytes==0.50.2",
]

# Optional: the browser editor scripts/edit_app.py (`pip install -e .[app]`). gradio 6 caps pillow below 13 (hence the
# core pin on 12.x); its dependencies leave torch alone and include no torchvision.
APP_REQUIRES = [
    "gradio==6.31.0",
]

setup(
    name="instruct2dream",
    version="0.1.0",
    description="Few-shot personalized image editing: DreamBooth on InstructPix2Pix (CompVis latent-diffusion fork)",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": TEST_REQUIRES + MEMORY_REQUIRES + APP_REQUIRES,
        "eval": EVAL_REQUIRES,
        "memory": MEMORY_REQUIRES,
        "app": APP_REQUIRES,
        "convert": CONVERT_REQUIRES,
    },
)
