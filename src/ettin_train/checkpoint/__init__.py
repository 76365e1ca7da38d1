"""Reading raw Composer checkpoints (the original runs' and ours) without importing Composer."""

from ettin_train.checkpoint.composer_format import find_checkpoint, load_checkpoint, model_state_dict

__all__ = ["find_checkpoint", "load_checkpoint", "model_state_dict"]
