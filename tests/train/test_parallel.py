"""Scale-out on CPU (gloo): the same tiny recipe and global batch on 1 and 2 processes, DDP and FSDP2;
a sharded checkpoint from 2 processes resumed on 1 and exported; two nodes on one machine (the Composer
launcher's multi-node flags, and the Slurm script's launch line); torchrun and the Slurm script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ettin_train.checkpoint import load_checkpoint, model_state_dict
from tests.conftest import ROOT, composer_launcher, free_port, run_ledger, run_train, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# Per-step loss tolerance between 1 and 2 processes. The 2-process loss is the mean of the ranks' mean
# losses (what DDP/FSDP average the gradients of); 1 process takes the mean over all the batch's
# predicted tokens. They differ when the two halves hold different numbers of real tokens (measured:
# up to 1.2e-3 on this recipe), and the weights then drift apart by rounding-sized amounts.
LOSS_TOL = 5e-3


_ledger = run_ledger


def _recipe(data: Path, run_dir: Path, **parallel) -> dict:
    # clm: no masking RNG, and no dropout, so 1 and 2 processes compute the same function of the same rows.
    return tiny_recipe(data, run_dir, "clm", model={"attn_out_dropout": 0.0}, train={"max_duration": "9ba"},
                       checkpoint={"interval": "3ba"}, logging={"console_interval": 1}, parallel=parallel)


def _composer(*args: str) -> subprocess.CompletedProcess:
    return run_train(*args, launcher=composer_launcher())


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    """one: 1 process, 9 steps. ddp, fsdp: 2 processes stopped after 6 of the same 9-step schedule
    (fsdp: full_shard with sharded checkpoints)."""
    root = tmp_path_factory.mktemp("parallel")
    run_train(str(write_recipe(root / "one.yaml", _recipe(tiny_data, root / "one"))))
    _composer(str(write_recipe(root / "ddp.yaml", _recipe(tiny_data, root / "ddp"))), "train.stop_after=6ba")
    fsdp = _recipe(tiny_data, root / "fsdp", strategy="full_shard", checkpoint_format="sharded")
    proc = _composer(str(write_recipe(root / "fsdp.yaml", fsdp)), "train.stop_after=6ba")
    assert "2 process(es) on cpu (full_shard, sharded checkpoints)" in proc.stdout
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_like_one_with_the_same_global_batch(runs, strategy):
    one, two = _ledger(runs / "one"), _ledger(runs / strategy)
    assert sorted(two) == [1, 2, 3, 4, 5, 6]
    for step in two:
        assert two[step]["rows"] == one[step]["rows"] == 8
        assert two[step]["tokens"] == one[step]["tokens"], f"step {step}: not the same global batch"
        assert abs(two[step]["loss"] - one[step]["loss"]) < LOSS_TOL, f"step {step}: {two[step]['loss']} vs {one[step]['loss']}"
    # training moved the loss, so agreeing losses are not agreeing initial losses only
    assert one[6]["loss"] < one[1]["loss"] - 0.05
    if strategy == "fsdp":
        # same processes, same rows: FSDP2 (with gloo averaging fixed) trains as DDP does, to rounding
        ddp = _ledger(runs / "ddp")
        assert all(abs(two[s]["loss"] - ddp[s]["loss"]) < 1e-5 for s in two)
        ckpt = runs / "fsdp" / "checkpoints"
        assert sorted(p.name for p in ckpt.iterdir()) == ["ep0-ba3", "ep0-ba6", "latest-rank0.pt"]
        assert sorted(p.name for p in (ckpt / "ep0-ba6").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_sharded_checkpoint_of_two_processes_resumes_on_one(runs, tmp_path):
    run = tmp_path / "fsdp"
    shutil.copytree(runs / "fsdp", run, symlinks=True)  # latest-rank0.pt stays a link to ep0-ba6/
    saved = model_state_dict(load_checkpoint(run / "checkpoints" / "ep0-ba6"))  # read with no process group
    proc = run_train(str(runs / "fsdp.yaml"), f"run_dir={run}")
    assert "1 process(es) on cpu (full_shard, sharded checkpoints)" in proc.stdout
    assert "resuming from" in proc.stdout and "ep0-ba6" in proc.stdout and "step      7" in proc.stdout
    assert "step      6" not in proc.stdout

    # The saved weights are the state of a 1-process run at step 6 up to the 1-vs-2-process difference.
    one_at_6 = model_state_dict(load_checkpoint(runs / "one" / "checkpoints" / "ep0-ba6-rank0.pt"))
    assert max(float((saved[k] - one_at_6[k]).abs().max()) for k in saved) < 1e-2

    ledger, one = _ledger(run), _ledger(runs / "one")
    assert sorted(ledger) == list(range(1, 10))  # each step once
    for step in (7, 8, 9):  # the same data position and schedule as the uninterrupted run
        assert ledger[step]["tokens"] == one[step]["tokens"] and ledger[step]["rows_sha256"] == one[step]["rows_sha256"]
        assert abs(ledger[step]["loss"] - one[step]["loss"]) < LOSS_TOL
    end, one_end = load_checkpoint(run / "checkpoints" / "ep0-ba9"), load_checkpoint(runs / "one" / "checkpoints" / "ep0-ba9-rank0.pt")
    assert end["state"]["timestamp"]["Timestamp"]["token"] == one_end["state"]["timestamp"]["Timestamp"]["token"]
    groups, one_groups = end["state"]["optimizers"]["StableAdamW"]["param_groups"], one_end["state"]["optimizers"]["StableAdamW"]["param_groups"]
    assert int(groups[0]["step"]) == 9 and groups[0]["lr"] == pytest.approx(one_groups[0]["lr"])
    weights, one_weights = model_state_dict(end), model_state_dict(one_end)
    assert max(float((weights[k] - one_weights[k]).abs().max()) for k in weights) < 1e-2


def test_activation_checkpointing_under_fsdp_trains_like_the_plain_run(runs, tmp_path):
    """One process, full_shard with every layer recomputed in the backward: the same losses as the plain
    run (no dropout, so recomputation is exact), and checkpoint keys without the wrapper's prefix."""
    run = tmp_path / "ac"
    proc = run_train(str(runs / "one.yaml"), f"run_dir={run}", "parallel.strategy=full_shard",
                     "parallel.activation_checkpointing=true")
    assert "(full_shard, full checkpoints, activation checkpointing)" in proc.stdout
    ledger, one = _ledger(run), _ledger(runs / "one")
    assert sorted(ledger) == sorted(one) and all(abs(ledger[s]["loss"] - one[s]["loss"]) < 1e-6 for s in one)
    weights, one_weights = model_state_dict(load_checkpoint(run)), model_state_dict(load_checkpoint(runs / "one"))
    assert weights.keys() == one_weights.keys()
    assert max(float((weights[k] - one_weights[k]).abs().max()) for k in weights) < 1e-5


def test_export_of_a_sharded_checkpoint_equals_export_of_the_full_one(runs, tmp_path):
    """The same step of the same recipe on 2 processes, saved sharded (FSDP) and full (DDP): the exports
    agree to rounding (the two strategies reduce gradients in a different order)."""
    from transformers import AutoConfig, ModernBertDecoderForCausalLM

    from ettin_train.export import main as export_main

    assert export_main([str(runs / "fsdp" / "checkpoints" / "ep0-ba6"), "--out", str(tmp_path / "sharded")]) == 0
    assert export_main([str(runs / "ddp" / "checkpoints" / "ep0-ba6-rank0.pt"), "--out", str(tmp_path / "full")]) == 0
    # a run folder of sharded checkpoints exports every one of them, in order
    assert export_main([str(runs / "fsdp"), "--out", str(tmp_path / "all")]) == 0
    tags = subprocess.run(["git", "-C", str(tmp_path / "all"), "tag"], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(tags) == ["step3", "step6"]

    def exported(repo: Path):
        tag = subprocess.run(["git", "-C", str(repo), "tag"], capture_output=True, text=True, check=True).stdout.split()
        assert tag == ["step6"]
        return AutoConfig.from_pretrained(repo).to_dict(), ModernBertDecoderForCausalLM.from_pretrained(repo).state_dict()

    (cfg_s, sd_s), (cfg_f, sd_f) = exported(tmp_path / "sharded"), exported(tmp_path / "full")
    differ = {"_name_or_path", "ettin_source"}  # where each was read from
    assert cfg_s["ettin_source"] == "ep0-ba6" and cfg_f["ettin_source"] == "ep0-ba6-rank0.pt"
    assert {k: v for k, v in cfg_s.items() if k not in differ} == {k: v for k, v in cfg_f.items() if k not in differ}
    assert sd_s.keys() == sd_f.keys()
    for k in sd_s:
        torch.testing.assert_close(sd_s[k], sd_f[k], rtol=0, atol=1e-6, msg=f"{k} differs")


# Two "nodes" on one machine: each launcher gets a /dev/shm of its own (a mount namespace), as a machine of its
# own has; on a shared one both nodes' local leaders would register streaming's shared-memory prefix 0.
OWN_SHM = ["unshare", "--mount", "--map-root-user", "sh", "-c", 'mount -t tmpfs none /dev/shm && exec "$@"', "node"]


def _own_shm_available() -> bool:
    return subprocess.run(OWN_SHM + ["true"], capture_output=True).returncode == 0


# Not a failure of ours: without user namespaces the two fake nodes would share streaming's shared memory.
NEEDS_OWN_SHM = pytest.mark.skipif(not _own_shm_available(), reason=(
    "two fake nodes on one machine each need a /dev/shm of their own (streaming's shared memory), made with "
    "`unshare --mount --map-root-user`, which this machine does not allow (user namespaces off)"))


def _on_two_nodes(node) -> list[subprocess.CompletedProcess]:
    """`node(rank)` for the node ranks 0 and 1 at once, as two machines start their launchers."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(node, (0, 1)))


def _same_run_as_one_node(two_nodes: Path, one_node: Path, steps: int) -> None:
    """Two nodes of one process ran what one node of two processes ran: the same ledger and weights."""
    ledger, one = _ledger(two_nodes), _ledger(one_node)
    assert sorted(ledger) == list(range(1, steps + 1))
    for step in ledger:
        assert {k: ledger[step][k] for k in ("rows", "tokens", "rows_sha256", "inputs_sha256")} == \
            {k: one[step][k] for k in ("rows", "tokens", "rows_sha256", "inputs_sha256")}, f"step {step}"
        assert abs(ledger[step]["loss"] - one[step]["loss"]) < 1e-6, f"step {step}"
    name = f"ep0-ba{steps}-rank0.pt"
    end, one_end = load_checkpoint(two_nodes / "checkpoints" / name), load_checkpoint(one_node / "checkpoints" / name)
    assert end["state"]["metadata"]["world_size"] == 2
    weights, one_weights = model_state_dict(end), model_state_dict(one_end)
    assert weights.keys() == one_weights.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], one_weights[k], rtol=0, atol=1e-6, msg=f"{k} differs")


@NEEDS_OWN_SHM
def test_two_nodes_of_one_process_train_like_one_node_of_two(runs, tmp_path):
    """The Composer launcher's multi-node flags, two launchers on 127.0.0.1: the run of `runs/ddp`."""
    port, run = free_port(), tmp_path / "two_nodes"

    def node(rank: int) -> subprocess.CompletedProcess:
        launcher = OWN_SHM + [str(BIN / "composer"), "--world_size", "2", "--node_rank", str(rank), "--base_rank", str(rank),
                              "-n", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
        return run_train(str(runs / "ddp.yaml"), f"run_dir={run}", "train.stop_after=3ba", launcher=launcher)

    first, second = _on_two_nodes(node)
    assert "2 process(es) on cpu (ddp)" in first.stdout and "done at step 3" in first.stdout
    _same_run_as_one_node(run, runs / "ddp", 3)


SLURM_NODE = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
              "SLURM_GPUS_ON_NODE": "1", "SLURM_LOCALID": "0", "OMP_NUM_THREADS": "1"}


@NEEDS_OWN_SHM
def test_slurm_scripts_launch_line_on_two_fake_nodes_trains_like_one_node(runs, tmp_path):
    """What srun starts on each node of a 2-node job (ETTIN_NODE_ONLY=1: the script's launch line without
    srun), with the variables Slurm sets there; MASTER_ADDR stands in for `scontrol show hostnames`."""
    port, run = free_port(), tmp_path / "slurm"

    def node(rank: int) -> subprocess.CompletedProcess:
        env = dict(os.environ, **SLURM_NODE, SLURM_NODEID=str(rank), SLURM_PROCID=str(rank), ETTIN_NODE_ONLY="1",
                   PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        return subprocess.run(OWN_SHM + ["bash", str(SBATCH), str(runs / "ddp.yaml"), f"run_dir={run}", "train.stop_after=3ba"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    for proc in _on_two_nodes(node):
        assert proc.returncode == 0, proc.stderr[-3000:]
    _same_run_as_one_node(run, runs / "ddp", 3)


def test_torchrun_launches_train_py_on_two_processes(tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, tmp_path / "run", train={"max_duration": "2ba"},
                                                           checkpoint={"interval": "2ba"}))
    proc = run_train(str(recipe), launcher=[str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())])
    assert "2 process(es) on cpu (ddp)" in proc.stdout and "done at step 2" in proc.stdout
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["state"]["metadata"]["world_size"] == 2


SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"


def test_slurm_script_parses_and_checks_the_recipe_before_launching(tiny_data, tmp_path):
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    env = dict(os.environ, ETTIN_PLAN_ONLY="1", PYTHON=sys.executable)
    # its --plan checks what the recipe points at, as a start does: the demo's data is built by make demo, so use ours
    data = [f"data.path={tiny_data / 'long'}", f"data.tokenizer={tiny_data / 'tokenizer'}", f"run_dir={tmp_path / 'run'}"]
    ok = subprocess.run(["bash", str(SBATCH), "yamls/demo/encoder/pretrain.yaml", "parallel.strategy=full_shard", *data],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "strategy: full_shard" in ok.stdout and "autoresume: true" in ok.stdout
    bad = subprocess.run(["bash", str(SBATCH), "yamls/demo/encoder/pretrain.yaml", "parallel.stratgy=ddp"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "parallel.stratgy" in bad.stderr and "parallel.strategy" in bad.stderr


@pytest.mark.parametrize("override, message", [
    ("parallel.checkpoint_format=sharded", "parallel.checkpoint_format: 'sharded' needs an FSDP strategy"),
    ("parallel.shard_size=4", "parallel.shard_size: 4 is for strategy 'hybrid'"),
    ("parallel.strategy=zero3", "must be one of ddp, full_shard, shard_grad_op, hybrid"),
])
def test_parallel_combinations_that_cannot_work_are_refused_before_anything_starts(tiny_data, tmp_path, override, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_data, tmp_path / "run"))
    proc = run_train(str(recipe), override, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_hybrid_shard_groups_must_divide_the_world(monkeypatch):
    from ettin_train.config.schema import ParallelConfig
    from ettin_train.train.parallel import ParallelError, shard_degrees

    assert shard_degrees(ParallelConfig(strategy="hybrid", shard_size=8), 32) == 4  # 4 replicas of 8-GPU shard groups
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert shard_degrees(ParallelConfig(strategy="hybrid"), 16) == 2  # default: one node per shard group
    assert shard_degrees(ParallelConfig(strategy="full_shard"), 16) is None
    with pytest.raises(ParallelError, match="parallel.shard_size 3 does not divide the world size 8"):
        shard_degrees(ParallelConfig(strategy="hybrid", shard_size=3), 8)
