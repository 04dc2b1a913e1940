"""The download stage: get the dataset archive onto disk, check it, unpack it safely.

A download is written to `<name>.part` and renamed only when complete, so a cut
transfer is resumed by the next run instead of being mistaken for the archive.
An archive is a zip or a tar (plain, .tar.gz/.tgz, ...). Every member is checked
before anything is extracted: files and folders only, all inside the target. The unpacked
folder replaces the old one in one rename (esclab.atomic), so the split stage only
ever sees a complete dataset or none.
"""

import gzip
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from esclab.atomic import atomic_dir
from esclab.checksums import sha256_of
from esclab.errors import EsclabError

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # bytes per network read: at most this much is lost when a connection drops
COPY_BLOCK = 1 << 20
OFFLINE = ("pass dataset.archive=/path/to/a/local/copy/of/the/archive (or dataset.source_dir=/path/to/its/unpacked/"
           "folder)")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)  # a cut or damaged tar
ZIP_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error)
RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class _ServerError(Exception):
    """A 5xx answer: the server's trouble, worth another attempt."""


class _Restart(Exception):
    """The server cannot continue the .part file: start the transfer over."""


def fetch(url: str, dest: Path, *, retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 60.0) -> Path:
    """Download `url` to `dest`, resuming after drops, so a flaky link costs a retry, not the whole transfer.

    `retries` further attempts follow the first, waiting backoff_s, 2*backoff_s, ...
    `timeout_s` is how long a silent connection is given before it counts as dead.
    """
    part = dest.with_suffix(dest.suffix + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    restarted = False
    while True:
        try:
            _transfer(url, part, timeout_s)
            break
        except _Restart:
            if restarted:
                raise EsclabError(f"{url} cannot resume the transfer into {part} even after restarting it: "
                                  f"delete {part} and rerun, or {OFFLINE}") from None
            log.warning("%s could not continue %s; starting the transfer over", url, part)
            part.unlink(missing_ok=True)
            restarted = True
        except (*RETRYABLE, _ServerError) as err:
            reason = _reason(err)
            if failures == retries:
                raise EsclabError(f"could not download {url} ({failures + 1} attempt(s), last error: {reason}): "
                                  f"check the network connection, or {OFFLINE}") from err
            delay = backoff_s * 2**failures
            failures += 1
            log.warning("%s: %s; retry %d/%d in %g s", url, reason, failures, retries, delay)
            time.sleep(delay)
    os.replace(part, dest)
    return dest


def _reason(err: BaseException) -> str:
    """The root cause ('[Errno 111] Connection refused'), not requests' nested wrappers, on one line."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    return " ".join(str(err).split()) or type(err).__name__


def _transfer(url: str, part: Path, timeout_s: float) -> None:
    """One attempt: continue `part` from its current size (or start it) until the server is done."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: byte offsets must count the file's bytes, not a compressed stream's
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        status = response.status_code
        if status == 416:
            raise _Restart
        if status >= 500:
            raise _ServerError(f"HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise EsclabError(f"{url} answered HTTP {status} {response.reason} (not retried): "
                              f"check dataset.url, or {OFFLINE}")
        if status == 200:
            offset = 0  # the server ignored the Range header and sends the whole file
        elif not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise _Restart
        length = response.headers.get("Content-Length")
        if length is not None:
            _check_space(part.parent, int(length), f"downloading {url}")
        total = offset + int(length) if length is not None else None
        with (part.open("ab" if offset else "wb") as out,
              tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=part.name.removesuffix(".part")) as bar):
            for chunk in response.iter_content(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def _check_space(folder: Path, needed: int, what: str) -> None:
    """Refuse up front rather than fill the disk and fail half-way."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise EsclabError(f"not enough disk space in {folder} for {what}: {needed} bytes needed, {free} free; "
                          "free some space or move the data folder to a bigger disk")


def verify(path: Path, *, sha256: str | None, size: int | None) -> str:
    """Check `path` against the pinned size and sha256, so a changed or damaged archive is never used.

    Returns the actual sha256. Unpinned values are only logged, with how to pin them.
    """
    actual_size = path.stat().st_size
    fix = f"if {path} is a damaged download, delete it and rerun `dvc repro download`"
    if size is not None and actual_size != size:
        raise EsclabError(f"size mismatch for {path}: expected {size} bytes (dataset.size), got {actual_size}; "
                          f"{fix}; if you trust this archive, set dataset.size={actual_size}")
    actual = sha256_of(path)
    if sha256 is not None and actual != sha256.strip().lower():
        raise EsclabError(f"sha256 mismatch for {path}: expected {sha256} (dataset.sha256), got {actual}; "
                          f"{fix}; if you trust this archive, set dataset.sha256={actual}")
    if sha256 is None or size is None:
        log.warning("%s is not pinned: %d bytes, sha256 %s; to refuse any other archive later, set "
                    "dataset.size=%d dataset.sha256=%s", path, actual_size, actual, actual_size, actual)
    else:
        log.info("%s matches dataset.size and dataset.sha256", path)
    return actual


@dataclass(frozen=True)
class _Member:
    """One archive entry, whatever the format: its name as stored, its size, what it is, the format's own record."""

    name: str
    size: int
    kind: str  # "file", "folder", or what else it is, as the refusal names it ("a symbolic link", ...)
    info: zipfile.ZipInfo | tarfile.TarInfo


# What a member is when it is neither a regular file nor a folder: never unpacked.
_ZIP_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a device file", stat.S_IFBLK: "a device file",
              stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}  # by the Unix mode a zip may carry
_TAR_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device file",
              tarfile.BLKTYPE: "a device file", tarfile.FIFOTYPE: "a FIFO"}


def _zip_member(info: zipfile.ZipInfo) -> _Member:
    kind = "folder" if info.is_dir() else _ZIP_KINDS.get(stat.S_IFMT(info.external_attr >> 16), "file")
    return _Member(info.filename, info.file_size, kind, info)


def _tar_member(info: tarfile.TarInfo) -> _Member:
    kind = ("file" if info.isreg() else "folder" if info.isdir()
            else _TAR_KINDS.get(info.type, f"an entry of unknown tar type {info.type!r}"))
    return _Member(info.name, info.size, kind, info)


def _check_member(archive: Path, member: _Member) -> None:
    """Refuse a member that would land outside the target folder, or that is anything but a file or a folder."""
    name = member.name
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        problem = "an absolute path"
    elif ".." in parts:
        problem = "a '..' component"
    elif member.kind not in ("file", "folder"):
        problem = member.kind
    else:
        return
    raise EsclabError(f"{archive} member {name!r} is {problem}; refusing to unpack anything from it (only files and "
                      "folders inside the archive's own folder are unpacked): use an untampered copy of the archive")


def _relative(member: _Member) -> str:
    """The member's path inside the archive without './' or empty parts; a folder's ends in '/' (as in a zip)."""
    path = "/".join(part for part in member.name.split("/") if part not in ("", "."))
    return f"{path}/" if member.kind == "folder" and path else path


def _top_folder(names: list[str]) -> str:
    """The one folder holding every member ('ESC-50-master/' in GitHub's zip, 'UrbanSound8K/' in Zenodo's tar.gz),
    else ''."""
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) == 1 and all("/" in name for name in names):
        return f"{tops.pop()}/"
    return ""


def _tar_to_the_end(tar: tarfile.TarFile) -> None:
    """tarfile's member list stops quietly where an archive is cut between two members. A whole tar ends in a zero
    block, and a gzip stream in a checksum that is checked once it is read to its end: check both."""
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError("it ends before its end-of-archive marker")
    while tar.fileobj.read(COPY_BLOCK):
        pass


@contextmanager
def _opened(archive: Path) -> Iterator[tuple[list[_Member], Callable[[_Member], IO[bytes]]]]:
    """The archive's members and a way to read one, for a tar (plain or compressed) or a zip.

    The format is told by content, since a download's name can lie; a file that is neither is opened as its
    suffix says, so that the error names what it should have been.
    """
    name = archive.name.lower()
    if tarfile.is_tarfile(archive) or (not zipfile.is_zipfile(archive) and name.endswith(TAR_SUFFIXES)):
        try:
            with tarfile.open(archive) as tar:
                members = [_tar_member(info) for info in tar.getmembers()]
                _tar_to_the_end(tar)
                yield members, lambda member: tar.extractfile(member.info)
        except TAR_ERRORS as err:
            raise EsclabError(f"{archive} is not a valid tar archive (truncated or corrupt? {err}): "
                              "delete it and rerun, or point dataset.archive at a good copy") from err
    else:
        try:
            with zipfile.ZipFile(archive) as zf:
                yield [_zip_member(info) for info in zf.infolist()], lambda member: zf.open(member.info)
        except ZIP_ERRORS as err:
            raise EsclabError(f"{archive} is not a valid zip archive (truncated or corrupt? {err}): "
                              "delete it and rerun, or point dataset.archive at a good copy") from err


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack the zip or tar (.tar, .tar.gz, .tgz, ...) `archive` so that `dest` holds its contents, all or nothing.

    Every member is checked before the first byte is written; a single top-level
    folder is dropped, so dest/audio exists whether or not the archive wraps it.
    """
    with _opened(archive) as (members, read):
        for member in members:
            _check_member(archive, member)
        paths = [_relative(member) for member in members]
        prefix = _top_folder([path for path in paths if path])
        dest.parent.mkdir(parents=True, exist_ok=True)
        _check_space(dest.parent, sum(m.size for m in members if m.kind == "file"), f"unpacking {archive}")
        with atomic_dir(dest) as tmp:
            for member, path in zip(members, paths):
                target = tmp / path.removeprefix(prefix)
                if member.kind == "folder":
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with read(member) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, COPY_BLOCK)
    log.info("unpacked %s into %s", archive, dest)
    return dest


def copy_tree(source: Path, dest: Path) -> Path:
    """Copy an already-unpacked dataset folder to `dest`, all or nothing.

    The folder is the user's to arrange: symbolic links in it (an `audio/` kept on
    another disk, say) are followed and what they point at is copied. Only a link to
    nothing, or one that leads back to a folder above it, is refused. Links inside a
    downloaded archive are another matter: `unpack` refuses every one.
    """
    if not source.is_dir():
        raise EsclabError(f"{source} is not a folder (dataset.source_dir): point it at the dataset's unpacked folder, "
                          "or set dataset.source_dir=null to use dataset.archive or dataset.url")
    for folder, dirnames, filenames in os.walk(source, followlinks=True):
        for link in (Path(folder, name) for name in dirnames + filenames if Path(folder, name).is_symlink()):
            if not link.exists():
                raise EsclabError(f"{link} is a symbolic link to {os.readlink(link)}, which does not exist "
                                  "(dataset.source_dir): fix the link or remove it")
            if link.is_dir() and Path(folder).resolve().is_relative_to(link.resolve()):
                raise EsclabError(f"{link} links back to {link.resolve()}, a folder that contains it, so the "
                                  "dataset would never end (dataset.source_dir): remove the link")
    with atomic_dir(dest) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    log.info("copied %s into %s", source, dest)
    return dest


def prepare_raw(dest: Path, *, downloads: Path, url: str | None = None, archive: str | Path | None = None,
                source_dir: str | Path | None = None, sha256: str | None = None, size: int | None = None,
                retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 60.0) -> Path:
    """The download stage: make `dest` the unpacked dataset from source_dir, else archive, else url.

    A fetched archive is kept in `downloads` and reused while it verifies; one that
    no longer verifies is reported, never deleted, since it may be the user's own.
    """
    if source_dir:
        return copy_tree(Path(source_dir), dest)
    if archive:
        path = Path(archive)
        if not path.is_file():
            raise EsclabError(f"{path} does not exist (dataset.archive): fix the path, "
                              "or set dataset.archive=null to download dataset.url")
    elif url:
        name = PurePosixPath(urlsplit(url).path).name
        if not name:
            raise EsclabError(f"dataset.url={url} does not end in a file name: give the archive's URL")
        path = downloads / name
        if path.exists():
            log.info("using %s, downloaded earlier (delete it to download again)", path)
        else:
            fetch(url, path, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)
    else:
        raise EsclabError("no dataset given: set one of dataset.url, dataset.archive or dataset.source_dir")
    verify(path, sha256=sha256, size=size)
    return unpack(path, dest)
