"""GPU benchmark: are the attention backends right, and how fast is a training step against transformers?

One call does everything, in this order, and prints a markdown table last (also written to --out):
  1. backend agreement: SDPA and, where they run, torch's varlen attention, FA4, flash-attn and (CUDA)
     FlexAttention against an fp32 SDPA reference,
     on the real layer shapes of the 150m encoder and a decoder (3 layers: global, local, local), in bf16;
  2. throughput: one training step (forward, backward, StableAdamW step; bf16 autocast as Composer's
     amp_bf16) of the 150m encoder and the 1b decoder at sequence 1024, and the 150m encoder at 7999 (the
     extension/decay length), for our model and for transformers' ModernBERT on the same batch and weights.
     tokens/s counts real (non-padding) tokens; MFU = model FLOPs (ettin_train.model.flops) / time / the
     card's dense bf16 peak; memory is the peak allocated.

    # on a GPU machine (about 5 minutes on an H100/H200):
    PYTHONPATH=src python benchmarks/gpu.py --out bench_out
    # the CPU-sized smoke path that CI runs (tiny shapes, fp32, dynamo without inductor):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py --smoke

The batch is Ettin-like: right-padded rows of random length (the longest = seq, mean about 0.6 x seq); MLM
masks 30% of the real tokens. Dropout is 0 in both models. transformers runs in its default configuration
with SDPA (its flash-attention-2 path needs flash-attn, which cannot be built on every machine).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ettin_train.model import EttinModel, ModelConfig
from ettin_train.model import ettin as ettin_module
from ettin_train.speed import batch_flops
from ettin_train.speed import peak_flops as card_peak_flops
from ettin_train.objectives import clm, mlm

MASK_ID, PAD_ID = 50284, 50283

@dataclass
class Row:
    size: str
    objective: str  # mlm (encoder) | clm (decoder)
    seq: int
    batch: int
    vocab: int = 50368  # the smoke path shrinks it: on a CPU the vocabulary projection dominates a tiny model


GPU_ROWS = [Row("150m", "mlm", 1024, 64), Row("1b", "clm", 1024, 16), Row("150m", "mlm", 7999, 8)]
SMOKE_ROWS = [Row("17m", "mlm", 128, 2, vocab=512), Row("17m", "clm", 128, 2, vocab=512)]


def make_batch(row: Row, vocab: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(int(0.2 * row.seq), row.seq + 1, (row.batch,), generator=g)
    lens[0] = row.seq
    ids = torch.randint(5, 50280, (row.batch, row.seq), generator=g) % vocab
    mask = (torch.arange(row.seq)[None, :] < lens[:, None]).long()
    batch = {"attention_mask": mask}
    if row.objective == "mlm":
        chosen = (torch.rand(row.batch, row.seq, generator=g) < 0.3) & mask.bool()
        batch["labels"] = torch.where(chosen, ids, torch.full_like(ids, -100))
        ids = torch.where(chosen, torch.full_like(ids, MASK_ID % vocab), ids)
    batch["input_ids"] = torch.where(mask.bool(), ids, torch.full_like(ids, PAD_ID % vocab))
    return {k: v.to(device) for k, v in batch.items()}


def hf_inputs(row: Row, batch: dict) -> dict:
    if row.objective == "mlm":
        return batch
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # HF shifts them itself
    return {**batch, "labels": labels}


def optimizer_for(model: torch.nn.Module):
    """The recipe's optimizer (optimi StableAdamW); fused AdamW where optimi is missing or fails here."""
    on_cuda = next(model.parameters()).is_cuda
    try:
        from optimi import StableAdamW

        # optimi would pick its Triton kernels for CPU tensors too; try one step on a scratch parameter first.
        scratch = torch.nn.Parameter(torch.ones(4, device=next(model.parameters()).device))
        scratch.grad = torch.ones_like(scratch)
        StableAdamW([scratch], lr=1e-4, triton=None if on_cuda else False).step()
        return StableAdamW(model.parameters(), lr=1e-4, weight_decay=1e-5, triton=None if on_cuda else False), \
            "StableAdamW"
    except Exception as e:  # noqa: BLE001 - report and fall back, so the model step is still measured
        print(f"optimi StableAdamW unusable here ({type(e).__name__}: {e}); using torch AdamW", flush=True)
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_cuda), "AdamW"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- 1. agreement


def check_backends(row: Row, device: torch.device, amp: bool) -> list[dict]:
    """Each backend's loss, final hidden states and gradients against an fp32 SDPA reference. bf16 is
    judged against the SDPA path's own bf16 error: a backend passes when its error is at most twice that
    (plus 1e-3) and below 2e-2; in fp32 (the CPU smoke path) it must match the reference to 1e-4."""
    dtype = torch.bfloat16 if amp else torch.float32
    # FlexAttention's backward does not run on a CPU (torch >= 2.14): there its forward is tested in tests/model.
    backends = [b for b in ("sdpa", "varlen", "fa4", "flash", "flex")
                if ettin_module.backend_runs(b, device, dtype) and (b != "flex" or device.type == "cuda")]
    results = []
    for objective in ("mlm", "clm"):
        cfg = ModelConfig(size=row.size, num_layers=3, causal=objective == "clm", attn_out_dropout=0.0,
                          vocab_size=row.vocab, attention_backend="sdpa")
        torch.manual_seed(0)
        ref = EttinModel(cfg).to(device)
        batch = make_batch(Row(row.size, objective, row.seq, row.batch, row.vocab), cfg.vocab_size, device, seed=1)
        loss_fn = mlm.loss if objective == "mlm" else clm.loss

        def run(model, autocast: bool):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                hidden, _ = model.encode(batch["input_ids"], batch["attention_mask"])
                loss = loss_fn(model, batch)
            loss.backward()
            grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
            return loss.item(), hidden.detach().float(), grads

        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        ref_loss, ref_hidden, ref_grads = run(ref, autocast=False)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        errors = {}
        for backend in backends:
            model = copy.deepcopy(ref)
            for layer in model.bert.encoder["layers"]:
                layer.attn.backend = backend
            loss, hidden, grads = run(model, autocast=amp)
            errors[backend] = dict(
                loss=abs(loss - ref_loss),
                hidden=float((hidden - ref_hidden).norm() / ref_hidden.norm()),
                grads=float((grads - ref_grads).norm() / ref_grads.norm()),
            )
        base = errors["sdpa"]
        for backend, err in errors.items():
            if amp:
                ok = all(err[k] <= 2 * base[k] + 1e-3 and err[k] < 2e-2 for k in ("hidden", "grads"))
            else:
                ok = err["hidden"] < 1e-4 and err["grads"] < 1e-4
            results.append(dict(model=f"{row.size} {objective} (3 layers)", backend=backend,
                                dtype="bf16 autocast" if amp else "fp32", ok=ok, **err))
    return results


# -------------------------------------------------------------------------------------------- 2. throughput


def build_variant(name: str, spec: dict, row: Row, device: torch.device, compile_backend: str):
    cfg = ModelConfig(size=row.size, causal=row.objective == "clm", attn_out_dropout=0.0, vocab_size=row.vocab,
                      attention_backend=spec.get("backend", "sdpa"))
    torch.manual_seed(0)
    ours = EttinModel(cfg)
    if spec["kind"] == "hf":
        from ettin_train.checkpoint.hf import to_hf

        extra = {"sparse_prediction": True} if row.objective == "mlm" else {}
        if row.vocab <= PAD_ID:  # the smoke path's small vocabulary: the demo tokenizer's special ids
            extra.update(pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, mask_token_id=4)
        model = to_hf(ours, attn_implementation="sdpa", **extra).to(device).train()
        del ours
        loss_of = lambda batch: model(**hf_inputs(row, batch)).loss  # noqa: E731
    else:
        model = ours.to(device).train()
        if spec.get("compile"):  # whole layers (fullgraph); the smoke path traces without code generation
            model.compile_layers(backend=compile_backend)
        objective = mlm if row.objective == "mlm" else clm
        loss_of = lambda batch: objective.loss(model, batch)  # noqa: E731
    return cfg, model, loss_of


def measure(name: str, spec: dict, row: Row, device: torch.device, amp: bool, warmup: int, steps: int,
            compile_backend: str, profile_to: Path | None = None) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg, model, loss_of = build_variant(name, spec, row, device, compile_backend)
    optimizer, opt_name = optimizer_for(model)
    batch = make_batch(row, cfg.vocab_size, device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a host sync, as a logged loss is

    start = time.perf_counter()
    first_loss = step()
    for _ in range(warmup - 1):
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    busy = profile_step(step, device, profile_to, f"{name} {row}") if profile_to else None
    if spec.get("backend") == "fa4":  # FA4 replaced torch's flash kernels process-wide: give them back
        from torch.nn.attention import restore_flash_attention_impl

        restore_flash_attention_impl()
    real = int(batch["attention_mask"].sum())
    flops = batch_flops(cfg, batch)  # the progress line's count: real lengths, predicted positions
    median = statistics.median(times)
    peak = card_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = dict(
        row=f"{row.size} {'encoder' if row.objective == 'mlm' else 'decoder'} @ {row.seq} x {row.batch}",
        variant=name, optimizer=opt_name, real_tokens=real, fill=real / (row.batch * row.seq),
        step_ms=1e3 * median, step_ms_min=1e3 * min(times), tokens_per_s=real / median,
        model_tflops=flops / median / 1e12, mfu=flops / median / peak if peak else None,
        peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        first_loss=first_loss, warmup_s=warm_s, gpu_busy=busy,
    )
    if spec["kind"] == "hf":  # whether transformers compiled its MLP/embeddings (its reference_compile default)
        result["hf_reference_compile"] = getattr(model.config, "reference_compile", None)
    return result  # the model, optimizer and batch die here; the caller collects before the next variant


def profile_step(step, device: torch.device, out: Path, title: str) -> float:
    """Profiles three steps; appends the costliest kernels to `out` and returns the fraction of wall time
    the GPU was busy (kernel time / wall time; well under 1 means the host, not the GPU, sets the pace)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernel_us = sum(getattr(e, attr, 0) for e in events if device.type != "cuda" or e.device_type.name == "CUDA")
    table = events.table(sort_by=attr, row_limit=25, max_name_column_width=70)
    with out.open("a") as f:
        f.write(f"\n## {title}: wall {wall / 3 * 1e3:.1f} ms/step, kernels {kernel_us / 3e3:.1f} ms/step\n{table}\n")
    return kernel_us / 1e6 / wall


def matmul_tflops(device: torch.device) -> float | None:
    """A large bf16 matrix product, as the card delivers it today: the ceiling MFU is read against."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


# ------------------------------------------------------------------------------------------------ reporting


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(env: dict, agreement: list[dict], rows: list[dict]) -> str:
    lines = [f"Card: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
             f"flash-attn {env['flash_attn']}; {env['date']}. bf16 matmul measured {fmt(env['matmul_tflops'], '.0f')} "
             f"TFLOP/s, MFU against the datasheet peak {fmt(env['peak_tflops'], '.1f')} TFLOP/s.", "",
             "| model | backend | dtype | loss diff | hidden rel err | grad rel err | ok |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in agreement:
        lines.append(f"| {a['model']} | {a['backend']} | {a['dtype']} | {a['loss']:.2e} | {a['hidden']:.2e} | "
                     f"{a['grads']:.2e} | {'yes' if a['ok'] else 'NO'} |")
    return "\n".join(lines + [""] + step_table(rows))


def step_table(rows: list[dict]) -> list[str]:
    """The throughput table's lines (also scripts/gpu_check.py's), each variant against transformers' row."""
    lines = ["| row | variant | step ms (median) | real tokens/s | model TFLOP/s | MFU | peak mem GiB | "
             "first loss | vs transformers |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    hf = {r["row"]: r for r in rows if r["variant"].startswith("transformers") and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['variant']} | {r['error']} | | | | | | |")
            continue
        base = hf.get(r["row"])
        ratio = f"{base['step_ms'] / r['step_ms']:.2f}x" if base else "-"
        lines.append(f"| {r['row']} | {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['model_tflops']:.1f} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_mem_gib'], '.1f')} | "
                     f"{r['first_loss']:.4f} | {ratio} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU-sized shapes, fp32, no code generation")
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 10; smoke 2)")
    parser.add_argument("--rows", type=int, nargs="+", help="indices of the rows to run (default: all)")
    parser.add_argument("--variants", nargs="+", help="names of the variants to run (default: all)")
    parser.add_argument("--batch-scale", type=float, nargs="+", default=[1.0],
                        help="run each row at these multiples of its batch size")
    parser.add_argument("--profile", action="store_true", help="profile each variant; kernels go to --out/profile.txt")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="after this many seconds the optional variant (ours with padded SDPA) is skipped")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    amp = device.type == "cuda"
    rows_to_run = SMOKE_ROWS if args.smoke or device.type != "cuda" else GPU_ROWS
    rows_to_run = [r for i, r in enumerate(rows_to_run) if args.rows is None or i in args.rows]
    rows_to_run = [Row(r.size, r.objective, r.seq, max(1, round(r.batch * k)), r.vocab)
                   for r in rows_to_run for k in args.batch_scale]
    steps = args.steps or (2 if device.type != "cuda" else 10)
    warmup = 1 if device.type != "cuda" else 3
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    peak = card_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
               transformers=hf_version, flash_attn="yes" if ettin_module.flash_attn_varlen_func else "not installed",
               varlen_window=ettin_module.VARLEN_WINDOW, fa4="yes" if ettin_module.fa4_available() else "not installed",
               date=time.strftime("%Y-%m-%d"), peak_tflops=peak / 1e12 if peak else None,
               matmul_tflops=matmul_tflops(device))
    print(json.dumps(env), flush=True)

    # Rows longer than the 64-token half window of local layers, so the window binds.
    probe = Row("150m", "mlm", 600, 4) if device.type == "cuda" else Row("17m", "mlm", 160, 3, vocab=512)
    agreement = [] if args.skip_agreement else check_backends(probe, device, amp)
    for a in agreement:
        print("agreement", json.dumps(a), flush=True)
    print(f"agreement checked at {time.perf_counter() - started:.0f} s", flush=True)

    # The flash kernels each where they run here; FlexAttention where its backward runs (CUDA); then the
    # baseline; the uncompiled and padded variants last, as optional ones under the time budget.
    dtype = torch.bfloat16 if amp else torch.float32
    fast = [b for b in ("varlen", "fa4", "flash") if ettin_module.backend_runs(b, device, dtype)]
    variants = {f"ours {b}+compile": dict(kind="ours", backend=b, compile=True) for b in fast}
    if device.type == "cuda":
        variants["ours flex+compile"] = dict(kind="ours", backend="flex", compile=True)
    variants["ours sdpa+compile"] = dict(kind="ours", backend="sdpa", compile=True)
    variants["transformers sdpa"] = dict(kind="hf")
    # On CUDA the main comparison is the default backend (the first flash kernel that runs) against
    # transformers; FlexAttention (the default before 2026-12) and padded SDPA come after, under the budget.
    main_variants = [name for name in variants if device.type != "cuda" or name == "transformers sdpa"
                     or (fast and name == f"ours {fast[0]}+compile") or (not fast and name == "ours flex+compile")]
    if device.type == "cuda":
        variants["ours flex"] = dict(kind="ours", backend="flex")
    if args.variants:
        variants = {name: spec for name, spec in variants.items() if name in args.variants}
    profile_to = None
    if args.profile:
        profile_to = (args.out or Path(".")) / "profile.txt"
        profile_to.parent.mkdir(parents=True, exist_ok=True)
    results = []
    # Main variants of every row first, so a slow card still reports the comparison the issue asks for.
    for pass_main in (True, False):
        for row in rows_to_run:
            for name, spec in variants.items():
                if (name in main_variants) != pass_main:
                    continue
                if not pass_main and time.perf_counter() - started > args.budget_s:
                    results.append(dict(row=f"{row.size} {row.objective} @ {row.seq}", variant=name,
                                        error="skipped (time budget)"))
                    continue
                try:
                    r = measure(name, spec, row, device, amp, warmup, steps, compile_backend, profile_to)
                except Exception as e:  # one failing variant must not lose the others' numbers
                    r = dict(row=f"{row.size} {row.objective} @ {row.seq}", variant=name,
                             error=f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                results.append(r)
                print("result", json.dumps(r), flush=True)
                gc.collect()

    table = report(env, agreement, results)
    print(f"\n{table}\n\ntotal {time.perf_counter() - started:.0f} s", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(dict(env=env, agreement=agreement, results=results), indent=1))
        (args.out / "results.md").write_text(table + "\n")
    failed = [a for a in agreement if not a["ok"]] + [r for r in results if "error" in r and "skipped" not in r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
