"""The model settings of the original Ettin runs by (size, objective, phase), for checkpoints that record none.

TABLE is generated from the recipes in yamls/{encoder,decoder}/<size>/<phase>.yaml (`derive`), not written by
hand: `python -m ettin_train.checkpoint.recipe_table` prints it, `--write` rewrites this file's table, and
tests/checkpoint/test_recipe_table.py fails when the two disagree. The values are those of the original configs
(research notes sections 1.4-1.6): RoPE theta 10000 in pre-training, 160000 in extension and decay, with local
layers at 10000 in the 17m extension (encoder and decoder) and the 17m, 32m, 68m and 400m decoder decays.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

# The fields of a row, in order.
FIELDS = ("rope_theta_global", "rope_theta_local", "sliding_window", "global_attn_every_n_layers")
OBJECTIVES = {"mlm": "encoder", "clm": "decoder"}  # the original layout has these two (recipe folder names)

# (size, objective, phase) -> (rope_theta_global, rope_theta_local, sliding_window, global_attn_every_n_layers)
# BEGIN TABLE (generated)
TABLE = {
    ('17m', 'mlm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('17m', 'mlm', 'extension'): (160000.0, 10000.0, 128, 3),
    ('17m', 'mlm', 'decay'): (160000.0, 160000.0, 128, 3),
    ('17m', 'clm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('17m', 'clm', 'extension'): (160000.0, 10000.0, 128, 3),
    ('17m', 'clm', 'decay'): (160000.0, 10000.0, 128, 3),
    ('32m', 'mlm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('32m', 'mlm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('32m', 'mlm', 'decay'): (160000.0, 160000.0, 128, 3),
    ('32m', 'clm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('32m', 'clm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('32m', 'clm', 'decay'): (160000.0, 10000.0, 128, 3),
    ('68m', 'mlm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('68m', 'mlm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('68m', 'mlm', 'decay'): (160000.0, 160000.0, 128, 3),
    ('68m', 'clm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('68m', 'clm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('68m', 'clm', 'decay'): (160000.0, 10000.0, 128, 3),
    ('150m', 'mlm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('150m', 'mlm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('150m', 'mlm', 'decay'): (160000.0, 160000.0, 128, 3),
    ('150m', 'clm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('150m', 'clm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('150m', 'clm', 'decay'): (160000.0, 160000.0, 128, 3),
    ('400m', 'mlm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('400m', 'mlm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('400m', 'mlm', 'decay'): (160000.0, 160000.0, 128, 3),
    ('400m', 'clm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('400m', 'clm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('400m', 'clm', 'decay'): (160000.0, 10000.0, 128, 3),
    ('1b', 'mlm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('1b', 'mlm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('1b', 'mlm', 'decay'): (160000.0, 160000.0, 128, 3),
    ('1b', 'clm', 'pretrain'): (10000.0, 10000.0, 128, 3),
    ('1b', 'clm', 'extension'): (160000.0, 160000.0, 128, 3),
    ('1b', 'clm', 'decay'): (160000.0, 160000.0, 128, 3),
}
# END TABLE


def derive(yamls: str | Path) -> dict[tuple[str, str, str], tuple]:
    """The table as the recipes in `yamls` give it (every recipe loaded and checked as train.py loads it)."""
    from ettin_train.config import load_recipe
    from ettin_train.model.config import SIZES
    from ettin_train.phases import NAMES

    table = {}
    for size, objective, phase in itertools.product(SIZES, OBJECTIVES, NAMES):
        recipe, _ = load_recipe(Path(yamls) / OBJECTIVES[objective] / size / f"{phase}.yaml")
        m = recipe.model
        if (recipe.objective, recipe.phase, m.size) != (objective, phase, size):
            raise ValueError(f"{OBJECTIVES[objective]}/{size}/{phase}.yaml is a {recipe.objective} {m.size} {recipe.phase} recipe")
        table[(size, objective, phase)] = (float(m.rope_theta_global), float(m.local_theta), m.sliding_window,
                                           m.global_attn_every_n_layers)
    return table


def _source(table: dict) -> str:
    rows = "".join(f"    {key!r}: {value!r},\n" for key, value in table.items())
    return "TABLE = {\n" + rows + "}\n"


if __name__ == "__main__":
    text = _source(derive(Path(__file__).resolve().parents[3] / "yamls"))
    if sys.argv[1:] == ["--write"]:
        path = Path(__file__)
        head, rest = path.read_text().split("# BEGIN TABLE (generated)\n")
        path.write_text(head + "# BEGIN TABLE (generated)\n" + text + "# END TABLE\n" + rest.split("# END TABLE\n", 1)[1])
    else:
        print(text, end="")
