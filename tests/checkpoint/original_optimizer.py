"""Checkpoints built the way the original training code builds and saves its optimizer, not converted from ours.

The original (orionw/bert24, research sections 1.10 and 3.5) wraps FlexBERT in Composer's `HuggingFaceModel`
(attribute `model`), builds StableAdamW over `param_groups_weight_decay(model)` (`main.py`): the groups
`[no weight decay, decay]`, and Composer 0.24.1 saves torch's plain `optimizer.state_dict()`: state keyed by the
integers torch numbers the parameters with, group after group, and optimi 0.2.1's group fields (no `triton`).
`OriginalRun` does the same on our model, whose module tree and parameter names are FlexBERT's (section 2.2), and
keeps its optimizer in memory after saving, so a test can compare a resumed run with one that never stopped.
"""

from __future__ import annotations

import datetime
import random

import numpy as np
import torch
from optimi import StableAdamW

from ettin_train.model import EttinModel

# optimi 0.2.1's parameter-group fields (research section 3.5), with LambdaLR's `initial_lr`; optimi 0.3 adds `triton`.
OPTIMI_021_GROUP = ("lr", "beta1", "beta2", "eps", "weight_decay", "decouple_lr", "max_lr", "kahan_sum", "foreach",
                    "gradient_release", "setup", "step", "initial_lr", "params")
TIMESTAMP_KEYS = ("iteration", "epoch", "batch", "sample", "token", "epoch_in_iteration", "token_in_iteration",
                  "batch_in_epoch", "sample_in_epoch", "token_in_epoch", "total_wct", "iteration_wct", "epoch_wct",
                  "batch_wct")


class HuggingFaceModel(torch.nn.Module):
    """Composer's HuggingFaceModel holds the network as `model`: the `model.` prefix of every saved name."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """bert24 `main.py` `param_groups_weight_decay`, as written there."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class OriginalRun:
    """The original's model wrapper and optimizer (`decoupled_stableadamw`), trained step by step in memory."""

    def __init__(self, model_cfg, *, lr: float, betas, eps: float, weight_decay: float, seed: int):
        torch.manual_seed(seed)
        self.lr = lr
        self.composer_model = HuggingFaceModel(EttinModel(model_cfg))
        self.optimizer = StableAdamW(param_groups_weight_decay(self.composer_model, weight_decay), lr=lr,
                                     betas=tuple(betas), eps=eps, weight_decay=weight_decay, decouple_lr=True,
                                     triton=False)
        for group in self.optimizer.param_groups:  # what Composer's LambdaLR sets on the groups
            group["initial_lr"] = lr
        self.steps = 0

    def step(self, batch: dict, lr: float, loss) -> None:
        """One optimizer step as Composer takes it (one microbatch): zero the grads, backward, step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss(self.composer_model.model, batch).backward()
        self.optimizer.step()
        self.steps += 1

    def named_state(self) -> dict[str, dict]:
        """Each parameter's optimizer state under its saved name (`model.bert...`)."""
        return {name: self.optimizer.state[p] for name, p in self.composer_model.named_parameters()}

    def saved_optimizer(self) -> dict:
        """The optimizer's state dict as the original saved it: index-keyed, optimi 0.2.1's group fields."""
        saved = self.optimizer.state_dict()
        groups = [{k: g[k] for k in OPTIMI_021_GROUP} for g in saved["param_groups"]]
        state = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                 for i, s in saved["state"].items()}
        return {"state": state, "param_groups": [dict(g, step=g["step"].clone()) for g in groups]}

    def checkpoint(self, samples: int, tokens: int) -> dict:
        """The whole `ep0-ba{N}-rank0.pt` dict (section 3.5) after `self.steps` steps of `samples` samples and
        `tokens` tokens in all; the learning rate of the next step is this run's peak."""
        weights = {k: v.clone() for k, v in self.composer_model.state_dict().items()}
        lambda_lr = {"base_lrs": [self.lr, self.lr], "last_epoch": self.steps, "_step_count": self.steps + 1,
                     "_get_lr_called_within_step": False, "_last_lr": [self.lr, self.lr], "lr_lambdas": [None]}
        optimizer = self.saved_optimizer()
        for group in optimizer["param_groups"]:
            group["lr"] = self.lr
        when = dict.fromkeys(TIMESTAMP_KEYS, 0) | {k: datetime.timedelta(0) for k in TIMESTAMP_KEYS if k.endswith("_wct")}
        when |= {"batch": self.steps, "batch_in_epoch": self.steps, "sample": samples, "sample_in_epoch": samples,
                 "token": tokens, "token_in_epoch": tokens}
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state(),
               "cuda": torch.zeros(16, dtype=torch.uint8)}
        return original_envelope(weights, optimizer, lambda_lr, when, [rng])


def original_envelope(weights: dict, optimizer: dict, lambda_lr: dict, timestamp: dict, rng: list[dict]) -> dict:
    """A Composer 0.24.1 checkpoint of the original runs around these parts (section 3.5): no dataset position (a
    map-style loader: `dataset_state.train` None), the original's callbacks, a HuggingFace integration entry."""
    return {
        "state": {
            "model": weights,
            "optimizers": {"StableAdamW": optimizer},
            "schedulers": {"LambdaLR": lambda_lr},
            "algorithms": [],
            "callbacks": {"SpeedMonitor": {"total_eval_wct": 0.0}, "LRMonitor": {}, "ScheduledGarbageCollector": {},
                          "LogGradNorm": {}, "PackingEfficency": {}},
            "timestamp": {"Timestamp": timestamp},
            "rank_zero_seed": 21,
            "run_name": "ettin-encoder-tiny",
            "dataset_state": {"train": None, "eval": {}},
            "integrations": {"huggingface": {"model": {"config": {"content": {"model_type": "flex_bert"},
                                                                  "class": "src.bert_layers.model.FlexBertForMaskedLM"}},
                                             "tokenizer": {}}},
            "metadata": {"composer_env_info": {"composer_version": "0.24.1"}, "torch_version": "2.4.0",
                         "device": "gpu", "precision": "amp_bf16", "world_size": 1, "device_train_microbatch_size": 8,
                         "train_dataloader_batch_size": 8},
        },
        "rng": rng,
    }
