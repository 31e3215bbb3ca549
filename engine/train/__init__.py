"""Training SAEs: the loop on streamed activations (``sae``), one trainer per SAE family (``families``), resumable
checkpoints (``checkpoint``) and the ``train-sae`` command (``commands``)."""

from .families import TRAINERS, TopKTrainer
from .sae import TrainConfig, evaluate, prepare_output, train_sae, train_saes

__all__ = ["TRAINERS", "TopKTrainer", "TrainConfig", "evaluate", "prepare_output", "train_sae", "train_saes"]
