"""Evaluation on held-out data: the metrics of each objective (metrics.py) on fixed rows and masks
(data.py), for a sweep over checkpoints (`ettin-eval`, cli.py) and during training (the recipe's `eval`)."""

from ettin_train.eval.table import format_table, print_table

__all__ = ["format_table", "print_table"]
