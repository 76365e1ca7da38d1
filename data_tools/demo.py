"""The offline demo (`make demo`): the journey of a user, with a tiny Ettin encoder and decoder on the CPU.

1. Data: a corpus from the docstrings of the installed Python standard library, a small byte-level BPE
   tokenizer with the ModernBERT special tokens, MDS shards (128-token pieces for pre-training, 512-token
   pieces for extension and decay).
2. Training: `train.py` on yamls/demo/{encoder,decoder}/{pretrain,extension,decay}.yaml in order; each later
   phase starts from the previous phase's run folder (its `init.checkpoint`), as a real run does.
3. An interrupted run: the encoder's pre-training first stops half-way (`train.stop_after`, as a preempted job
   ends with a checkpoint), and the same command run again resumes it from that checkpoint to the end.
4. Export: `ettin-export` turns every checkpoint of every phase into a commit of a git repository per model,
   tagged step{N}, ext{N} and decay{N} (demo_runs/hf/{encoder,decoder}).
5. Use: the final decay tag of each repository is cloned and loaded with transformers' AutoModelForMaskedLM /
   AutoModelForCausalLM and AutoTokenizer from that folder alone; fill-mask and generation are printed.
6. Evaluation: `ettin-eval` over every tag of both repositories on held-out docstrings prints its table and
   writes a plot of each metric against tokens seen (demo_runs/eval/eval.png); then one downstream task (a
   four-item multiple-choice file the demo writes) is scored for both models across their tags.

    python data_tools/demo.py            # everything (measured time in the README)
    python data_tools/demo.py --samples  # only steps 4 to 6, from existing runs
Runs are resumable: finished phases are skipped, an interrupted phase resumes from its checkpoint, and
checkpoints already exported are reported as such.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo_runs"
PHASES = ("pretrain", "extension", "decay")
OBJECTIVES = {"encoder": "AutoModelForMaskedLM", "decoder": "AutoModelForCausalLM"}
INTERRUPT_AT = "400_000tok"  # half of the demo encoder's 800_000-token pre-training
# Phrases of the corpus's own style where a tiny model can be right: "Return a list of ..." is among its commonest
# openings (41 times in the training docstrings; "a tuple of" 14), so nouns fit the first mask, with "list" the
# corpus's answer; the second asks for the word after "of", where "the" is the commonest. (Checked on the 2026-12-03
# run's final encoder: 'list' first for the first, 'the' first for the second; "Return [MASK] if the file exists."
# got pronouns and nouns instead of True.)
PROMPTS = ("Return a [MASK] of the names in the module.", "Return a list of [MASK] names.")
GENERATE = ("Return a new", "This module provides")


def prepare_data() -> None:
    from ettin_train.data.demo_corpus import build_demo_data

    data = OUT / "data"
    if (data / "heldout_short" / "index.json").exists():
        print(f"demo data: reusing {data}")
        return
    t = time.time()
    counts = build_demo_data(str(data), max_chars=1_250_000, vocab_size=1024, seq_lens={"short": 128, "long": 512},
                             heldout_chars=200_000)  # of the stdlib's ~1.5M characters; heldout_*: the recipes' eval.sources
    print(f"demo data: tokenizer and MDS shards in {data} ({counts['short']} + {counts['long']} samples, {time.time() - t:.0f}s)")


def _env(threads: int | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads or os.cpu_count() or 1)))
    # The demo starts ~16 Python processes, each importing torch, Composer and transformers: with bytecode
    # caching off (PYTHONDONTWRITEBYTECODE, as on some shared machines) each recompiled them (~14 s of CPU).
    # The cache goes under demo_runs/, so the venv and the checkout stay untouched.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(OUT / ".pycache"))
    return env


def _timed(label: str, cmd: list[str], threads: int | None = None) -> None:
    """Runs `cmd` and prints its wall time and its own CPU time (user + sys, with the children it waited for):
    on a shared machine the CPU time is the one that says what it costs."""
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(threads))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    print(f"=== {label}: {time.time() - t:.0f}s wall, {usage.ru_utime + usage.ru_stime:.0f}s CPU", flush=True)


def chain(objective: str, train: bool = True, threads: int | None = None) -> Path:
    """One model's journey: its three phases in order (the encoder's pre-training interrupted and resumed), then
    every phase's checkpoints into one tagged git repository; returns the repository."""
    for phase in PHASES if train else ():
        recipe = f"yamls/demo/{objective}/{phase}.yaml"
        if objective == "encoder" and phase == "pretrain" and not (OUT / objective / phase / "checkpoints").exists():
            print(f"\n=== {objective} / {phase}, interrupted: python train.py {recipe} train.stop_after={INTERRUPT_AT}",
                  flush=True)
            _timed(f"{objective} / {phase} (interrupted)", [sys.executable, "train.py", recipe,
                                                             f"train.stop_after={INTERRUPT_AT}"], threads)
            print(f"\n=== {objective} / {phase}, the same command again: it resumes from the checkpoint above", flush=True)
        else:
            print(f"\n=== {objective} / {phase}: python train.py {recipe}", flush=True)
        _timed(f"{objective} / {phase}", [sys.executable, "train.py", recipe], threads)
    repo = OUT / "hf" / objective
    for phase in PHASES:
        run = OUT / objective / phase
        print(f"\n=== export {objective} / {phase}: ettin-export {run.relative_to(ROOT)} --out {repo.relative_to(ROOT)}",
              flush=True)
        _timed(f"export {objective} / {phase}", [sys.executable, "-m", "ettin_train.export", str(run), "--out", str(repo)],
               threads)
    print(f"{repo.relative_to(ROOT)} tags: {' '.join(_git(repo, 'tag', '--sort=creatordate').split())}", flush=True)
    return repo


def train_and_export(train: bool = True) -> dict[str, Path]:
    """The encoder's and the decoder's chains side by side, one core each (their lines carry the run's name):
    the tiny model's operations are too small for two threads to pay off, two processes keep both cores busy."""
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // len(OBJECTIVES))
    with ThreadPoolExecutor(len(OBJECTIVES)) as pool:
        futures = {o: pool.submit(chain, o, train, threads) for o in OBJECTIVES}
        return {o: f.result() for o, f in futures.items()}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def checkout_tag(repo: Path, prefix: str) -> tuple[str, Path]:
    """The newest tag starting with `prefix`, cloned into its own folder (transformers reads a local folder as it
    is, so a revision of a local repository is a checkout)."""
    tag = [t for t in _git(repo, "tag", "--sort=creatordate").split() if t.startswith(prefix)][-1]
    folder = OUT / "hf" / f"{repo.name}-{tag}"
    if not folder.exists():
        subprocess.run(["git", "-c", "advice.detachedHead=false", "clone", "--quiet", "--branch", tag, str(repo), str(folder)],
                       check=True)
    return tag, folder


def samples(repos: dict[str, Path]) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer

    print()
    loaded = {}
    for objective, auto in OBJECTIVES.items():
        tag, folder = checkout_tag(repos[objective], "decay")
        model = getattr(transformers, auto).from_pretrained(str(folder)).eval()
        if getattr(model.config, "ettin_note", None):  # the export's README: the decoder's local RoPE theta
            from ettin_train.checkpoint.hf import patch_decoder_local_rope

            patch_decoder_local_rope(model)
        loaded[objective] = model, AutoTokenizer.from_pretrained(str(folder))
        print(f"{objective}: tag {tag} of {repos[objective].relative_to(ROOT)}, loaded with transformers.{auto} "
              f"({type(model).__name__}) from {folder.relative_to(ROOT)}")

    model, tok = loaded["encoder"]
    print("\nfill-mask (encoder, transformers pipeline):")
    fill = transformers.pipeline("fill-mask", model=model, tokenizer=tok, top_k=5)
    for text in PROMPTS:
        top = ", ".join(f"{c['token_str'].strip()!r} {c['score']:.2f}" for c in fill(text))
        print(f"  {text!r} -> top 5 (with probabilities): {top}")

    model, tok = loaded["decoder"]
    print("\ngeneration (decoder, greedy, model.generate):")
    for text in GENERATE:
        ids = torch.tensor([[tok.cls_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
        print(f"  {text!r} -> {tok.decode(out[0, 1:], skip_special_tokens=True)!r}")



def evaluate(repos: dict[str, Path]) -> None:
    """`ettin-eval` over every exported tag of both repositories, on the held-out docstrings: the table (every
    metric against tokens seen) and the plot. Tags already in demo_runs/eval are not recomputed."""
    cmd = [sys.executable, "-m", "ettin_train.eval", *(str(r) for r in repos.values()),
           "--data", str(OUT / "data" / "heldout_short"), "--out", str(OUT / "eval"), "--seq-len", "128"]
    print(f"\n=== evaluate every tag: ettin-eval {' '.join(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd[3:])}",
          flush=True)
    _timed("evaluate every tag", cmd)
    baseline(OUT / "eval" / "eval.json")


def baseline(table: Path) -> None:
    """The encoder's final held-out masked accuracy beside the most-frequent-token baseline: the accuracy of
    always answering the token most frequent among the very positions ettin-eval scored (same rows and masks)."""
    import json
    from collections import Counter

    from transformers import AutoTokenizer

    from ettin_train.eval.data import EvalSettings, HeldOut
    from ettin_train.objectives import SpecialTokens, get_objective

    saved = json.loads(table.read_text())
    final = [r for r in saved["rows"] if r["kind"] == "encoder"][-1]  # sorted by tokens seen
    tok = AutoTokenizer.from_pretrained(str(OUT / "data" / "tokenizer"))
    held = HeldOut(str(OUT / "data" / "heldout_short"), get_objective("mlm"), SpecialTokens.from_tokenizer(tok),
                   EvalSettings(**saved["settings"]["eval"]))
    counts = Counter()
    for batch in held.batches():
        counts.update(batch["labels"][batch["labels"] != -100].tolist())
    token, n = counts.most_common(1)[0]
    print(f"\nencoder held-out masked accuracy: {final['accuracy']:.3f} at {final['tag']}, against {n / sum(counts.values()):.3f} "
          f"for always answering the most frequent token ({tok.decode([token])!r}) on the same {sum(counts.values())} masked positions")


# A four-item multiple-choice task on docstring phrases: cheap, and the same items for both models.
DEMO_TASK = [("Return the number of", ["items in the list.", "green ideas sleep furiously."], 0),
             ("Raise ValueError if the", ["purple banana sings.", "value is not found."], 1),
             ("This module provides", ["functions for working with files.", "the the the the."], 0),
             ("Open the file and", ["sky of the of.", "read its lines."], 1)]


def downstream(repos: dict[str, Path]) -> None:
    """One downstream task, in lm-eval's custom-task format, scored for every tag of both models (the decoder
    through lm-eval's HFLM, the encoder by pseudo-log-likelihood), added to the table and plot of demo_runs/eval."""
    from ettin_train.eval.harness import write_choice_task

    write_choice_task(OUT / "tasks", "demo_docstrings", DEMO_TASK)
    cmd = [sys.executable, "-m", "ettin_train.eval", *(str(r) for r in repos.values()), "--tasks", "demo_docstrings",
           "--include-path", str(OUT / "tasks"), "--out", str(OUT / "eval")]
    print("\n=== a downstream task for both models, every tag: ettin-eval demo_runs/hf/encoder demo_runs/hf/decoder "
          "--tasks demo_docstrings --include-path demo_runs/tasks --out demo_runs/eval", flush=True)
    _timed("downstream task", cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", action="store_true", help="only export and print samples from the existing runs")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.chdir(ROOT)
    sys.dont_write_bytecode, sys.pycache_prefix = False, _env()["PYTHONPYCACHEPREFIX"]  # as for the commands (_env)
    start = time.time()
    if not args.samples:
        prepare_data()
    repos = train_and_export(train=not args.samples)
    samples(repos)
    evaluate(repos)
    downstream(repos)
    print(f"\ndemo finished in {time.time() - start:.0f}s; runs, checkpoints, recipe copies and the exported "
          f"repositories are in {OUT}/")


if __name__ == "__main__":
    main()
