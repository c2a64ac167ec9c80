"""tfdp: data-parallel training of GPT-style language models on TensorFlow.

Data flow (see README): config -> strategy -> data -> model -> optimizer
-> Trainer.fit -> model_dir. `tfdp.run.train` wires it together.
"""

__version__ = "0.1.0"
