"""The engine's training entry points: RL (``train``), preference optimization, and SFT."""

from xxpo.train.config import POLICY_METHODS, PREFERENCE_METHODS, TrainConfig
from xxpo.train.loop import RunResult, Trainer, train
from xxpo.train.preference import train_preference

__all__ = ["POLICY_METHODS", "PREFERENCE_METHODS", "RunResult", "TrainConfig", "Trainer", "train", "train_preference"]
