"""tfdp: data-parallel training of GPT-style language models on TensorFlow.

Data flow (see README and ../shared/DESIGN.md): flags -> one frozen config ->
strategy -> a Task (tfdp/tasks/: what differs between jobs) -> the Runner's
loop (tfdp/runner.py) -> model_dir. `tfdp.run.train` (tfdp-train) and
`tfdp.finetune.finetune` (tfdp-finetune) wire it together.
"""

__version__ = "0.1.0"
