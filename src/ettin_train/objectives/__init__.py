"""Objective registry: a recipe's `objective` key names one of these. A new objective is one file
that defines an `Objective` and one line here."""

from ettin_train.objectives.base import Objective, SpecialTokens
from ettin_train.objectives.clm import CLM
from ettin_train.objectives.mlm import MLM
from ettin_train.objectives.mntp import MNTP

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (MLM, CLM, MNTP)}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise KeyError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Objective", "SpecialTokens", "get_objective"]
