"""Optimizer state matched to this run's parameters by identity, never by the position of a parameter group.

A saved StableAdamW state comes in one of two layouts:

- **name-keyed** (what Composer 0.32.1 writes, through torch's `get_optimizer_state_dict`): `state` is keyed by
  parameter name (`model.bert...`) and each group's `params` lists names. The name says whose moments they are.
- **index-keyed** (what the original runs wrote, research section 3.5: torch's plain `Optimizer.state_dict`):
  `state` is keyed by integers that number the parameters group after group, in the order the groups were built.
  The original built them with `param_groups_weight_decay` (bert24 `main.py`): `[no weight decay, decay]`, where a
  parameter has no weight decay if `ndim <= 1` or its name ends in `.bias`, each group in module order. The
  original's module tree and parameter names are ours (research section 2.2), so applying that rule to our names
  says which parameter each integer is. Which saved group is which is read off the group itself: its parameter
  count and the shapes of its moments, so a group order other than the original's is still matched correctly.

Every parameter's moments are checked against its shape; a state that leaves a parameter without moments is refused
(`OptimizerStateError`, naming the first such parameter in module order) before anything is loaded or written. The
matched state is then written back in this optimizer's own groups (index-keyed for `Optimizer.load_state_dict`,
name-keyed for Composer), each group with the hyperparameters of the saved group its parameters came from, and
with the keys an older optimi did not save (0.2.1 has no `triton`) filled in from this optimizer, before optimi's
load hook reads them. `triton` is always this machine's choice: a GPU run's kernels do not run on a CPU.

Nothing here imports Composer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


class OptimizerStateError(ValueError):
    """A saved optimizer state that does not fit this run's parameters."""


def no_weight_decay(name: str, shape: tuple[int, ...]) -> bool:
    """The original's rule (bert24 `param_groups_weight_decay`): norms, biases and any 1-D parameter."""
    return len(shape) <= 1 or name.endswith(".bias")


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups as the original builds them: `[no weight decay, decay]`, each in module order."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        (no_decay if no_weight_decay(name, tuple(p.shape)) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@dataclass(frozen=True)
class ParamLayout:
    """This run's optimizer in names: its groups (lists of parameter names as the checkpoint spells them, e.g.
    `model.bert.embeddings.tok_embeddings.weight`), each parameter's shape (in module order) and the optimizer's
    defaults (to fill keys an older optimi did not save)."""

    groups: tuple[tuple[str, ...], ...]
    shapes: dict[str, tuple[int, ...]]
    defaults: dict

    @classmethod
    def of(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "model.") -> "ParamLayout":
        names = {id(p): prefix + name for name, p in model.named_parameters()}
        groups = tuple(tuple(names[id(p)] for p in g["params"]) for g in optimizer.param_groups)
        shapes = {prefix + name: tuple(p.shape) for name, p in model.named_parameters()}
        return cls(groups, shapes, dict(optimizer.defaults))

    def original_groups(self) -> tuple[list[str], list[str]]:
        """The names in the original's two groups, `[no weight decay, decay]`, each in module order."""
        no_decay = [n for n, s in self.shapes.items() if no_weight_decay(n, s)]
        return no_decay, [n for n, s in self.shapes.items() if not no_weight_decay(n, s)]

    def match(self, saved: dict) -> dict[str, tuple[dict, int]]:
        """Each parameter name -> (its saved per-parameter state, the index of the saved group it was in).
        Raises OptimizerStateError naming the first parameter (module order) with no moments of its shape."""
        state, groups = saved.get("state") or {}, saved.get("param_groups") or []
        keys = {type(k) for k in state} | {type(p) for g in groups for p in g.get("params", [])}
        found: dict[str, tuple[dict, int]] = {}
        if keys <= {str}:
            for gi, group in enumerate(groups):
                found.update((name, (state[name], gi)) for name in group["params"] if name in state)
            how = "name-keyed"
        elif keys <= {int}:
            found = self._match_indices(state, groups)
            how = "index-keyed"
        else:
            raise OptimizerStateError(f"optimizer state is keyed by {sorted(k.__name__ for k in keys)}, "
                                      "neither parameter names nor indices")
        for name, shape in self.shapes.items():
            moments = found.get(name, ({}, 0))[0]
            if not all(isinstance(moments.get(m), torch.Tensor) and tuple(moments[m].shape) == shape for m in MOMENTS):
                sizes = [len(g.get("params", [])) for g in groups]
                raise OptimizerStateError(
                    f"optimizer state ({how}, groups of {sizes} parameters) has no moments of shape {list(shape)} for "
                    f"parameter {name}")
        return found

    def _match_indices(self, state: dict, groups: list[dict]) -> dict[str, tuple[dict, int]]:
        """Index-keyed state: each saved group is the original group whose size and moment shapes it has (the
        original's order, no decay first, decides if both fit). A group of the right size whose shapes differ is
        still paired, so that `match` names the parameter whose shape differs."""
        candidates = list(self.original_groups())
        found: dict[str, tuple[dict, int]] = {}
        for gi, group in enumerate(groups):
            ids = group["params"]
            sized = [c for c in candidates if len(c) == len(ids)]
            fits = [c for c in sized if all(
                tuple(state.get(i, {}).get("exp_avg", torch.empty(0)).shape) == self.shapes[n] for i, n in zip(ids, c))]
            if fits or sized:
                names = (fits or sized)[0]
                candidates.remove(names)
                found.update((name, (state[i], gi)) for i, name in zip(ids, names) if i in state)
        return found

    def rebuild(self, saved: dict, keyed: str) -> tuple[dict, list[str]]:
        """The saved state in this optimizer's groups, keyed by `index` (for `Optimizer.load_state_dict`) or by
        `name` (for Composer's `set_optimizer_state_dict`), and the group keys that were filled from the defaults."""
        found = self.match(saved)
        state, groups, added = {}, [], set()
        for group_names in self.groups:
            origins = {found[n][1] for n in group_names}
            if len(origins) > 1:
                raise OptimizerStateError(f"parameters {group_names[0]} and "
                                          f"{next(n for n in group_names if found[n][1] != found[group_names[0]][1])} "
                                          "share a group in this optimizer but were saved in different groups")
            origin = saved["param_groups"][origins.pop()] if origins else {}
            group = {k: v for k, v in origin.items() if k != "params"}
            for key in self.defaults.keys() - group.keys():
                group[key] = self.defaults[key]
                added.add(key)
            group["triton"] = self.defaults.get("triton", False)
            keys = [n if keyed == "name" else len(state) + i for i, n in enumerate(group_names)]
            state.update((k, found[n][0]) for k, n in zip(keys, group_names))
            groups.append(dict(group, params=keys))
        return {"state": state, "param_groups": groups}, sorted(added)
