"""A failed data_tools/tokenize_to_mds.py run leaves nothing that refuses the next one (issue 21): a tokenizer path
with a typo is one `error:` line before --out is touched, and the corrected command then writes the shards."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import ROOT


def test_a_tokenizer_typo_is_one_line_and_the_corrected_run_is_not_refused(tmp_path, tiny_data, capsys):
    spec = importlib.util.spec_from_file_location("tokenize_to_mds", ROOT / "data_tools" / "tokenize_to_mds.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": "the quick brown fox jumps over the lazy dog " * 8}) + "\n"
                              for i in range(6)))
    out = tmp_path / "out"
    args = [str(corpus), "--out", str(out), "--seq-len", "32", "--min-len", "4"]
    capsys.readouterr()
    assert script.main([*args, "--tokenizer", str(tiny_data / "tokenzer")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "tokenzer" in err[0], err
    assert not out.exists()
    assert script.main([*args, "--tokenizer", str(tiny_data / "tokenizer")]) == 0
    assert json.loads((out / "index.json").read_text())["shards"]
