"""The tests' S3 server: real HTTP, reachable by streaming's downloader as a training run reaches a bucket."""

from __future__ import annotations

from tests.conftest import S3Store


def test_streaming_downloads_what_was_uploaded(s3: S3Store, tmp_path):
    from streaming.base.storage.download import CloudDownloader

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "index.json").write_text('{"shards": []}')
    bucket = s3.bucket()
    uri = s3.upload(tmp_path / "src", bucket, "shards")
    assert s3.keys(bucket) == ["shards/index.json"]
    CloudDownloader.direct_download(f"{uri}/index.json", str(tmp_path / "got.json"), timeout=60)
    assert (tmp_path / "got.json").read_text() == '{"shards": []}'
