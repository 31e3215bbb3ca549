"""Training SAEs: a TopK SAE on streamed activations (``sae``) and the ``train-sae`` command (``commands``)."""

from .sae import TopKTrainer, TrainConfig, evaluate, prepare_output, train_sae

__all__ = ["TopKTrainer", "TrainConfig", "evaluate", "prepare_output", "train_sae"]
