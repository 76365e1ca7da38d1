"""The table's text (what the demo prints) and its files, from rows like ettin-eval's."""

from __future__ import annotations

import csv
import json

import matplotlib.image

from ettin_train.eval import format_table, print_table
from ettin_train.eval.table import Table


def test_print_table_shows_every_row_and_the_plot(tmp_path, capsys):
    table = Table(tmp_path)
    table.settings, table.phases = {"eval": {}, "data": {}}, {"encoder": {"pretrain": 0, "extension": 2000}}
    for tag, tokens, loss in (("ext1", 2500, 5.5), ("step2", 1000, 6.25), ("step4", 2000, 6.0)):
        table.add({"kind": "encoder", "objective": "mlm", "tag": tag, "phase": "pretrain", "step": 1, "tokens": tokens,
                   "data": "heldout", "loss": loss, "accuracy": 0.1, "scored_tokens": 10, "source": "x"})
    table.add({"kind": "decoder", "objective": "clm", "tag": "step2", "phase": "pretrain", "step": 2, "tokens": 1000,
               "data": "heldout", "loss": 6.5, "accuracy": 0.2, "perplexity": 665.1, "scored_tokens": 40, "source": "y"})
    table.plot()
    print_table(tmp_path / "eval.json")
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["kind", "tag", "tokens", "data", "loss", "accuracy", "perplexity"]
    # sorted by kind, then tokens; a missing metric is "-"
    assert [line.split()[:3] for line in out[1:5]] == [["decoder", "step2", "1000"], ["encoder", "step2", "1000"],
                                                       ["encoder", "step4", "2000"], ["encoder", "ext1", "2500"]]
    assert out[2].split()[-1] == "-" and out[1].split()[-1] == "665.1000"
    assert out[5] == f"plot: {tmp_path / 'eval.png'}"
    assert format_table(tmp_path) == "\n".join(out[:5])
    with (tmp_path / "eval.csv").open() as f:
        assert [r["tag"] for r in csv.DictReader(f)] == ["step2", "step2", "step4", "ext1"]
    assert json.loads((tmp_path / "eval.json").read_text())["phases"]["encoder"]["extension"] == 2000
    assert matplotlib.image.imread(tmp_path / "eval.png").shape[1] > 600
