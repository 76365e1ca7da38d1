"""A tag of a local export repository as a folder transformers loads.

`from_pretrained(local_repo, revision="step100")` does not check a revision out: for a local folder
transformers reads the files in the folder as they are (whatever is checked out, usually `main`) and ignores
`revision`. `checkout_tag` writes the tag's files into a folder of their own (git archive, the working tree
untouched); `load_tag` loads a tag's model (and tokenizer) from there.

    from ettin_train.checkpoint.tags import load_tag
    model, tokenizer = load_tag("hf/ettin-encoder-150m", "step100")
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def checkout_tag(repo: str | Path, tag: str, dest: str | Path) -> Path:
    """The files of `tag` of the git repository `repo` in `dest` (created); returns `dest`."""
    dest = Path(dest)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", f"refs/tags/{tag}"], capture_output=True)
    if archive.returncode:
        raise ValueError(f"{repo}: no tag {tag} ({archive.stderr.decode().strip()})")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def load_tag(repo: str | Path, tag: str, model_class=None, **kwargs):
    """(model, tokenizer) of `tag` of a local export repository: transformers' Auto class for the tag's
    architecture (AutoModelForMaskedLM / AutoModelForCausalLM) unless `model_class` is given; `kwargs` go to
    from_pretrained. The weights are read into memory, so the temporary checkout is removed."""
    import json

    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix=f"{tag}-") as tmp:
        folder = checkout_tag(repo, tag, tmp)
        if model_class is None:
            causal = "ModernBertDecoderForCausalLM" in json.loads((folder / "config.json").read_text()).get("architectures", [])
            model_class = AutoModelForCausalLM if causal else AutoModelForMaskedLM
        model = model_class.from_pretrained(str(folder), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder)) if (folder / "tokenizer.json").exists() else None
    return model, tokenizer
