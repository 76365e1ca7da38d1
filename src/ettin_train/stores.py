"""Run folders in object stores (`checkpoint.remote`): where remote checkpoints are written, found and read.

A store folder (`s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`, `hf://datasets/ORG/NAME/PREFIX`) mirrors a run folder:
`checkpoints/ep*-ba*-rank0.pt` with their markers `NAME.complete`, `run.json`, `recipe.yaml`, `recipes/`,
`ledger.jsonl`. The saver (train/reliability.py) uploads each checkpoint, then the run's small files, then the
marker LAST: an object store has no rename, so the marker's presence is what makes a checkpoint complete there, as
locally. A checkpoint without its marker (an upload cut short) is never resumed from, nor exported.

All three schemes take the same code path below; only the four primitives of `Store` differ (boto3 for s3, with
`S3_ENDPOINT_URL` as streaming and Composer read it; google-cloud-storage for gs; huggingface_hub's HfFileSystem
for hf). Only s3 is tested here (a real S3-protocol server, tests/store/). Nothing here imports Composer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from ettin_train.checkpoint import digest
from ettin_train.checkpoint.composer_format import CHECKPOINT_NAME
from ettin_train.checkpoint.digest import MARKER
from ettin_train.checkpoint.run_identity import IDENTITY, RECIPES, RunFolderError, read_identity

CHECKPOINTS = "checkpoints"
RUN_FILES = (IDENTITY, "recipe.yaml", "ledger.jsonl", "eval.jsonl")  # what a resume (and ettin-eval) reads
TRIES = 3  # an upload or download is tried this often (1 s, then 2 s apart) before the run stops naming it


class StoreError(RuntimeError):
    """An object that could not be uploaded, downloaded or listed: one line naming it."""


def is_store(uri: str | None) -> bool:
    return bool(uri) and (uri.split("://")[0] in ("s3", "gs") or uri.startswith("hf://datasets/")) and "://" in uri


class Store:
    """One store folder. `names()` lists the objects under it (relative names); `put`, `get`, `remove` one object."""

    def __init__(self, uri: str):
        if not is_store(uri):
            raise StoreError(f"{uri}: not an object store folder (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
                             "hf://datasets/ORG/NAME/PREFIX)")
        self.uri = uri.rstrip("/")
        self.scheme, rest = self.uri.split("://", 1)
        if self.scheme == "hf":
            self.bucket, self.prefix = "", rest  # HfFileSystem paths: datasets/ORG/NAME/PREFIX
        else:
            self.bucket, _, self.prefix = rest.partition("/")
        self._client = None

    def url(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def client(self):
        if self._client is None:
            if self.scheme == "s3":
                import boto3

                self._client = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)
            elif self.scheme == "gs":
                from google.cloud import storage  # pip install google-cloud-storage

                self._client = storage.Client().bucket(self.bucket)
            else:
                from huggingface_hub import HfFileSystem

                self._client = HfFileSystem(token=os.environ.get("HF_TOKEN"))
        return self._client

    def names(self) -> list[str]:
        c, base = self.client(), self._key("")
        if self.scheme == "s3":
            pages = c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        elif self.scheme == "gs":
            keys = [b.name for b in c.list_blobs(prefix=base)]
        else:
            keys = c.find(self.prefix) if c.exists(self.prefix) else []
            base = self.prefix.rstrip("/") + "/"
        return sorted(k[len(base):] for k in keys if k.startswith(base) and not k.endswith("/"))

    def put(self, local: Path, name: str) -> None:
        c = self.client()
        if self.scheme == "s3":
            c.upload_file(str(local), self.bucket, self._key(name))
        elif self.scheme == "gs":
            c.blob(self._key(name)).upload_from_filename(str(local))
        else:
            c.put_file(str(local), self._key(name))

    def get(self, name: str, local: Path) -> None:
        c = self.client()
        local.parent.mkdir(parents=True, exist_ok=True)
        if self.scheme == "s3":
            c.download_file(self.bucket, self._key(name), str(local))
        elif self.scheme == "gs":
            c.blob(self._key(name)).download_to_filename(str(local))
        else:
            c.get_file(self._key(name), str(local))

    def remove(self, name: str) -> None:
        c = self.client()
        if self.scheme == "s3":
            c.delete_object(Bucket=self.bucket, Key=self._key(name))
        elif self.scheme == "gs":
            c.blob(self._key(name)).delete()
        else:
            c.rm(self._key(name))


def _tried(what: str, url: str, action) -> None:
    """`action()`, tried TRIES times; then StoreError naming the object."""
    for attempt in range(TRIES):
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - any store or network failure: retried, then one line
            if attempt == TRIES - 1:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise StoreError(f"cannot {what} {url} after {TRIES} tries ({type(e).__name__}: {first})") from None
            time.sleep(2**attempt)


def check_reachable(uri: str) -> list[str]:
    """The store folder can be listed (credentials, bucket, endpoint): its names; else StoreError in one line."""
    store = Store(uri)
    try:
        return store.names()
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StoreError(f"checkpoint.remote {uri}: cannot list it ({type(e).__name__}: {first})") from None


def _step(name: str) -> int:
    return int(CHECKPOINT_NAME.match(name.rsplit("/", 1)[-1]).group(2))


def complete_checkpoints(names: list[str], folder: str = CHECKPOINTS) -> list[str]:
    """The checkpoints of `folder` (in the store's `names`) that have their marker, oldest first."""
    there = set(names)
    prefix = f"{folder}/" if folder else ""
    found = [n for n in names if n.startswith(prefix) and CHECKPOINT_NAME.match(n[len(prefix):]) and f"{n}{MARKER}" in there]
    return sorted(found, key=_step)


def run_files(run_dir: Path) -> list[str]:
    """The run folder's small files a resume needs, relative to it."""
    recipes = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / RECIPES).glob("*.yaml"))
    return [f for f in RUN_FILES if (run_dir / f).is_file()] + recipes


def upload_checkpoint(store: Store, checkpoint: Path, run_dir: Path) -> None:
    """The checkpoint, the run's small files (its ledger holds the checkpoint's steps), and the marker last."""
    name = f"{CHECKPOINTS}/{checkpoint.name}"
    for local, remote in [(checkpoint, name), *((run_dir / f, f) for f in run_files(run_dir)),
                          (Path(f"{checkpoint}{MARKER}"), f"{name}{MARKER}")]:
        _tried("upload to", store.url(remote), lambda: store.put(local, remote))


def upload_missing(store: Store, run_dir: Path) -> None:
    """At a start: run_dir's complete checkpoints newer than the store's newest complete one (an upload that failed
    and stopped the run) are uploaded, so the store catches up before training goes on."""
    from ettin_train.checkpoint.run_folder import marked_checkpoints

    done = complete_checkpoints(store.names())
    newest = _step(done[-1]) if done else -1
    for f in marked_checkpoints(run_dir / CHECKPOINTS):
        if _step(f.name) > newest:
            upload_checkpoint(store, f, run_dir)


def prune(store: Store, keep: int) -> None:
    """`checkpoint.keep` in the store: the oldest complete checkpoints beyond `keep` go, marker first."""
    done = complete_checkpoints(store.names())
    for name in done[: max(0, len(done) - keep)]:
        for n in (f"{name}{MARKER}", name):
            _tried("delete", store.url(n), lambda: store.remove(n))


def _download(store: Store, name: str, local: Path) -> None:
    _tried("download", store.url(name), lambda: store.get(name, local))


def _fetch_checked(store: Store, name: str, dest: Path, verify_digest: bool = True) -> str | None:
    """`name` and its marker into `dest` under the same file name; None if it matches its marker, else the problem."""
    local = dest / name.rsplit("/", 1)[-1]
    _download(store, f"{name}{MARKER}", Path(f"{local}{MARKER}"))
    _download(store, name, local)
    problem = digest.check(local, digest=verify_digest)
    return problem and problem.replace(str(local), store.url(name))


def restore(uri: str, run_dir: Path, check_identity, verify_digest: bool = True) -> Path | None:
    """Rank 0 before a start's folder repair: when the store holds a complete checkpoint newer than run_dir's newest
    complete one (an empty disk after a requeue on another node), it is downloaded, checked against its marker, and
    put into run_dir/checkpoints with the run's small files, so the local resume takes it. A damaged one is set aside
    in the store (`NAME.damaged`, its marker `NAME.damaged.complete-was`) and the one before it is used, as locally
    (run_folder.prepare_resume); with none left, RunFolderError and nothing changes. `check_identity(held)` refuses
    a store that holds another run before anything is downloaded. Returns the checkpoint restored, or None."""
    from ettin_train.checkpoint.run_folder import marked_checkpoints

    store, folder = Store(uri), run_dir / CHECKPOINTS
    local = marked_checkpoints(folder) if folder.is_dir() else []
    local_step = _step(local[-1].name) if local else -1
    names = store.names()
    newer = [n for n in complete_checkpoints(names) if _step(n) > local_step]
    if not newer:
        return None
    tmp = run_dir / ".from-store"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if IDENTITY in names:
            _download(store, IDENTITY, tmp / IDENTITY)
            held = json.loads((tmp / IDENTITY).read_text())
            check_identity(held)
            ours = read_identity(run_dir)
            if ours and ours.get("lineage") != held.get("lineage"):
                raise RunFolderError(f"run_dir {run_dir} and checkpoint.remote {uri} hold different runs of this recipe "
                                     f"(lineage {ours.get('lineage')} vs {held.get('lineage')} in their {IDENTITY}); "
                                     "use another run_dir or checkpoint.remote")
        good, damaged = None, []
        for name in reversed(newer):
            problem = _fetch_checked(store, name, tmp, verify_digest)
            if problem is None:
                good = name
                break
            damaged.append((name, problem))
        if good is None and not local:
            name, problem = damaged[0]
            raise RunFolderError(f"checkpoint {store.url(name)} is damaged ({problem}) and no complete checkpoint of this "
                                 "run is left before it; nothing was changed: restore it from a copy, or use another "
                                 "checkpoint.remote to start again")
        for name, problem in damaged:
            _set_aside(store, name, tmp)
            print(f"warning: checkpoint {store.url(name)} is damaged ({problem}); set aside as {name}.damaged, "
                  "resuming from the checkpoint before it", file=sys.stderr, flush=True)
        if good is None:
            return None  # the local run folder's newest is the one before them
        for f in run_files_in(names):
            _download(store, f, run_dir / f)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / good.rsplit("/", 1)[-1]
        os.replace(tmp / target.name, target)
        os.replace(tmp / f"{target.name}{MARKER}", f"{target}{MARKER}")  # the marker last, as everywhere
        print(f"note: restored {target.name} from {store.url(good)} (the store's newest complete checkpoint)",
              file=sys.stderr, flush=True)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_files_in(names: list[str]) -> list[str]:
    return [n for n in names if n in RUN_FILES or (n.startswith(f"{RECIPES}/") and n.endswith(".yaml"))]


def _set_aside(store: Store, name: str, tmp: Path) -> None:
    """The store's counterpart of digest.set_aside: the damaged bytes kept as NAME.damaged, unmarked first."""
    local = tmp / name.rsplit("/", 1)[-1]
    for src, dst in ((Path(f"{local}{MARKER}"), f"{name}.damaged{MARKER}-was"), (local, f"{name}.damaged")):
        _tried("upload to", store.url(dst), lambda: store.put(src, dst))
    for n in (f"{name}{MARKER}", name):
        _tried("delete", store.url(n), lambda: store.remove(n))


def fetch_checkpoint(uri: str, dest: Path) -> Path:
    """`checkpoint.load_path` in a store: a checkpoint file (with the marker beside it, when there is one, checked),
    or a store's run folder (its newest complete checkpoint), downloaded into `dest`. ValueError in one line for a
    damaged file or a folder without a complete checkpoint."""
    base, _, last = uri.rstrip("/").rpartition("/")
    if CHECKPOINT_NAME.match(last):
        store = Store(base)
        names = store.names()
        if last not in names:
            raise ValueError(f"{uri} does not exist")
        if f"{last}{MARKER}" not in names:  # a checkpoint from elsewhere (the original runs'): nothing to check against
            _download(store, last, dest / last)
            return dest / last
        name = last
    else:
        store = Store(uri)
        names = store.names()
        found = complete_checkpoints(names) or complete_checkpoints(names, "")
        if not found:
            raise ValueError(f"{uri}: no complete checkpoint (ep*-ba*-rank0.pt with its {MARKER} marker) in it or in "
                             f"its {CHECKPOINTS}/")
        name = found[-1]
    problem = _fetch_checked(store, name, dest)
    if problem:
        raise ValueError(f"{store.url(name)} is damaged ({problem}); refused")
    return dest / name.rsplit("/", 1)[-1]


def cache_folder(uri: str) -> Path:
    """Where ettin-export and ettin-eval keep a store's run folder: $ETTIN_STORE_CACHE, else ~/.cache/ettin-train/store."""
    root = Path(os.environ.get("ETTIN_STORE_CACHE") or Path.home() / ".cache" / "ettin-train" / "store")
    return root / uri.replace("://", "/", 1).rstrip("/")


def local_copy(uri: str) -> Path:
    """A store's run folder (or one checkpoint file) as a local folder, for ettin-export and ettin-eval: the run's
    small files and every complete checkpoint with its marker (copies already in the cache that match their marker
    are kept), each checked against its marker as the local code then does. Unmarked checkpoints are left out."""
    dest = cache_folder(uri)
    if CHECKPOINT_NAME.match(uri.rstrip("/").rpartition("/")[2]):
        try:
            return fetch_checkpoint(uri, dest.parent)
        except ValueError as e:  # damaged, or not there: one line as for a folder
            raise StoreError(str(e)) from None
    store = Store(uri)
    try:
        names = store.names()
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"{uri}: cannot list it ({type(e).__name__}: {str(e).strip()[:200]})") from None
    found = complete_checkpoints(names) or complete_checkpoints(names, "")
    if not found:
        raise StoreError(f"{uri}: no complete checkpoint (ep*-ba*-rank0.pt with its {MARKER} marker) in it or in its "
                         f"{CHECKPOINTS}/")
    for f in run_files_in(names):
        _download(store, f, dest / f)
    for name in found:
        local = dest / name
        _download(store, f"{name}{MARKER}", Path(f"{local}{MARKER}"))
        if not local.is_file() or digest.check(local) is not None:  # a cached copy is kept only if it is this one
            _download(store, name, local)
    return dest
