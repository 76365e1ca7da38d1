"""Files of a dataset folder in an object store (s3://, gs://, hf://datasets/..., any scheme streaming downloads),
fetched into a local cache folder the way streaming fetches shards: through streaming's own downloaders (so the
same credentials and S3_ENDPOINT_URL), with its retries and timeout, once per file, and checked before use.

Used by the replay of an imported order (data.order_remote); training shards go through StreamingDataset itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ettin_train.checkpoint.digest import file_sha256
from ettin_train.data.mds import ShardUnavailable


@dataclass(frozen=True)
class RemoteFolder:
    """`remote` (a URI) mirrored file by file into `local`; `key` is the recipe key that named it, for errors."""

    remote: str
    local: str
    key: str
    retry: int = 2  # streaming's download_retry: attempts in all
    timeout: float = 60.0

    def url(self, rel: str) -> str:
        return "/".join([self.remote.rstrip("/"), rel.strip("/")])

    def fetch(self, rel: str, sha256: str | None = None) -> Path:
        """`local/rel`, downloaded first if it is not there. The download lands under a temporary name and is
        renamed into place only once whole (and matching `sha256`, when given), so a reader never sees a part of
        a file and two processes fetching the same file at once both end with the same one. A failure leaves
        nothing behind (not even the cache folder, when this made it) and raises ShardUnavailable naming the URI."""
        from streaming.base.storage.download import CloudDownloader
        from streaming.base.util import retry

        target = Path(self.local) / rel
        if target.is_file():
            return target
        url = self.url(rel)
        made = _missing_parents(target.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{target.name}.downloading-", dir=target.parent)
        try:
            downloader = CloudDownloader.get(url)
            try:
                retry(clean_up_fn=downloader.clean_up, num_attempts=self.retry)(
                    lambda: downloader.download(url, os.path.join(tmp, target.name), self.timeout))()
            except Exception as e:  # noqa: BLE001 - whatever the store says, on one line
                raise ShardUnavailable(f"{self.key} {self.remote}: cannot download {url} after {self.retry} attempt(s) "
                                       f"({type(e).__name__}: {_first_line(e)})") from None
            got = _downloaded(Path(tmp), target.name)
            if sha256 is not None and file_sha256(got) != sha256:
                raise ShardUnavailable(f"{self.key} {self.remote}: {url} does not match its sha256 in index.json "
                                       "(changed in the store after the import, or damaged in transit)")
            os.replace(got, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in made:  # innermost first; only if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return target


def _missing_parents(folder: Path) -> list[Path]:
    out = []
    while not folder.exists():
        out.append(folder)
        folder = folder.parent
    return out


def _downloaded(tmp: Path, name: str) -> Path:
    """Where the downloader put the file: the name it was given, or (huggingface_hub keeps the repository's
    subfolders under the destination's folder) the one file of that name below it."""
    direct = tmp / name
    if direct.is_file():
        return direct
    found = [p for p in tmp.rglob(name) if p.is_file()]
    if len(found) != 1:
        raise ShardUnavailable(f"the download of {name} left {len(found)} files of that name in {tmp}")
    return found[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def order_folder(data) -> RemoteFolder | None:
    """The recipe's imported order in a store (data.order_remote, cached in data.order), or None for a local one."""
    if not data.order_remote:
        return None
    return RemoteFolder(data.order_remote, data.order, "data.order_remote", data.download_retry, data.download_timeout)
