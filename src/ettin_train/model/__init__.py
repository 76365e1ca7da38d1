"""The Ettin architecture and its size presets."""

from ettin_train.model.config import SIZES, ModelConfig
from ettin_train.model.ettin import EttinModel, Packed

__all__ = ["SIZES", "ModelConfig", "EttinModel", "Packed"]
