"""tfdp: data-parallel training of GPT-style language models on TensorFlow.

Data flow (README, ../shared/DESIGN.md): flags (trainer/) -> one frozen
config -> strategy (tfdp/strategy.py) -> a Task (tfdp/tasks/: what differs
between jobs) -> the Runner's loop (tfdp/runner.py) -> model_dir.

The Python API, the same jobs as the commands:

    tfdp.train(tfdp.Config(...), callbacks=[...])      # tfdp-train
    tfdp.finetune(tfdp.FinetuneConfig(...), callbacks=[...])  # tfdp-finetune
    tfdp.evaluate(model_dir, data=...)                  # tfdp-eval

and, for a job of one's own, `tfdp.Runner`, `tfdp.Schedule` and the
`tfdp.Task` interface with its two implementations. Names load on first
use, so `import tfdp` does not import TensorFlow.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> (module, attribute).
_API = {
    "train": ("tfdp.training", "train"),
    "finetune": ("tfdp.finetuning", "finetune"),
    "evaluate": ("tfdp.evaluation", "evaluate"),
    "Config": ("tfdp.config", "Config"),
    "FinetuneConfig": ("tfdp.config", "FinetuneConfig"),
    "Runner": ("tfdp.runner", "Runner"),
    "Schedule": ("tfdp.runner", "Schedule"),
    "Task": ("tfdp.tasks", "Task"),
    "LanguageModelTask": ("tfdp.tasks.language_model", "LanguageModelTask"),
    "ClassificationTask": ("tfdp.tasks.classification", "ClassificationTask"),
    "CompletionTask": ("tfdp.tasks.completion", "CompletionTask"),
    "UserError": ("tfdp.errors", "UserError"),
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'tfdp' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
