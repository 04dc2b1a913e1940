"""The download stage against a real HTTP server on 127.0.0.1 and real zips and tars in tmp_path."""

import hashlib
import io
import random
import shutil
import socket
import stat
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
from http_server import ArchiveServer

from esclab.data import download
from esclab.data.download import copy_tree, fetch, prepare_raw, unpack, verify
from esclab.errors import EsclabError

FILES = {
    "meta/esc50.csv": b"filename,fold,target\n1-100-A-0.wav,1,0\n",
    "audio/1-100-A-0.wav": random.Random(0).randbytes(300_000),  # large enough to be cut mid-transfer
}
FAST = dict(backoff_s=0.01, timeout_s=5.0)


def make_zip(path: Path, files: dict[str, bytes], top: str = "ESC-50-master/") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(top + name, data)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def assert_unpacked(dest: Path) -> None:
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == ["audio", "meta"]


@pytest.fixture
def site(tmp_path):
    archive = make_zip(tmp_path / "www" / "ESC-50-master.zip", FILES)
    with ArchiveServer(archive.parent) as server:
        yield server, archive


@pytest.fixture
def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ESC-50-master.zip"


def test_download_verify_unpack(site, tmp_path):
    server, archive = site
    dest, downloads = tmp_path / "raw", tmp_path / "downloads"
    prepare_raw(dest, downloads=downloads, url=server.url(archive.name), sha256=sha256(archive),
                size=archive.stat().st_size, **FAST)
    assert_unpacked(dest)
    assert (downloads / archive.name).read_bytes() == archive.read_bytes()
    assert leftovers(downloads) == [] and not list(downloads.glob("*.part")) and leftovers(tmp_path) == []
    assert server.requests == [(f"/{archive.name}", None)]


def test_verified_cached_archive_is_not_fetched_again(site, tmp_path):
    server, archive = site
    downloads = tmp_path / "downloads"
    for _ in range(2):
        prepare_raw(tmp_path / "raw", downloads=downloads, url=server.url(archive.name), sha256=sha256(archive))
    assert len(server.requests) == 1
    assert_unpacked(tmp_path / "raw")


def test_cached_archive_that_fails_verification_is_refused_and_kept(site, tmp_path):
    server, archive = site
    cached = tmp_path / "downloads" / archive.name
    cached.parent.mkdir()
    cached.write_bytes(b"someone else's file")
    with pytest.raises(EsclabError, match="sha256 mismatch"):
        prepare_raw(tmp_path / "raw", downloads=cached.parent, url=server.url(archive.name), sha256=sha256(archive))
    assert cached.read_bytes() == b"someone else's file" and server.requests == []
    assert not (tmp_path / "raw").exists()


def test_cut_transfer_is_resumed_from_where_it_stopped(site, tmp_path):
    server, archive = site
    server.drop_after(archive.stat().st_size // 2)
    dest = fetch(server.url(archive.name), tmp_path / "a.zip", **FAST)
    assert sha256(dest) == sha256(archive)
    assert len(server.requests) == 2 and server.requests[0][1] is None
    offset = int(server.requests[1][1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset < archive.stat().st_size


def test_part_file_left_by_an_earlier_run_is_resumed(site, tmp_path):
    server, archive = site
    (tmp_path / "a.zip.part").write_bytes(archive.read_bytes()[:100_000])
    dest = fetch(server.url(archive.name), tmp_path / "a.zip", **FAST)
    assert dest.read_bytes() == archive.read_bytes() and not (tmp_path / "a.zip.part").exists()
    assert server.requests == [(f"/{archive.name}", "bytes=100000-")]


def test_server_that_ignores_range_restarts_the_file(site, tmp_path):
    server, archive = site
    server.honour_ranges = False
    (tmp_path / "a.zip.part").write_bytes(b"x" * 1000)  # appending the 200 body to this would corrupt it
    assert fetch(server.url(archive.name), tmp_path / "a.zip", **FAST).read_bytes() == archive.read_bytes()


def test_unsatisfiable_range_restarts_from_scratch(site, tmp_path):
    server, archive = site
    (tmp_path / "a.zip.part").write_bytes(archive.read_bytes() + b"junk")
    assert fetch(server.url(archive.name), tmp_path / "a.zip", **FAST).read_bytes() == archive.read_bytes()
    assert [r[1] for r in server.requests] == [f"bytes={archive.stat().st_size + 4}-", None]


def test_server_errors_are_retried(site, tmp_path):
    server, archive = site
    server.fail(500, times=2)
    assert sha256(fetch(server.url(archive.name), tmp_path / "a.zip", **FAST)) == sha256(archive)
    assert len(server.requests) == 3


def test_persistent_server_error_gives_up_after_the_retries(site, tmp_path):
    server, archive = site
    server.fail(503, times=10)
    url = server.url(archive.name)
    with pytest.raises(EsclabError, match="503") as err:
        fetch(url, tmp_path / "a.zip", retries=2, **FAST)
    assert url in str(err.value) and len(server.requests) == 3 and not (tmp_path / "a.zip").exists()


def test_not_found_is_not_retried(site, tmp_path):
    server, _ = site
    url = server.url("missing.zip")
    with pytest.raises(EsclabError, match="404") as err:
        fetch(url, tmp_path / "a.zip", **FAST)
    assert url in str(err.value) and len(server.requests) == 1


def test_connection_refused_gives_up_after_retries_with_backoff(closed_port_url, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    with pytest.raises(EsclabError) as err:
        fetch(closed_port_url, tmp_path / "a.zip", retries=3, **FAST)
    message = str(err.value)
    assert closed_port_url in message and "dataset.archive=" in message and "\n" not in message
    assert waits == [0.01, 0.02, 0.04]


def test_unresolvable_host_names_the_url_and_the_offline_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    url = "http://esclab-no-such-host.invalid/ESC-50-master.zip"  # .invalid never resolves (RFC 6761)
    with pytest.raises(EsclabError) as err:
        fetch(url, tmp_path / "a.zip", retries=1, **FAST)
    message = str(err.value)
    assert url in message and "dataset.archive=" in message and "\n" not in message
    assert not (tmp_path / "a.zip").exists()


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_checksum_or_size_mismatch_names_both_values_and_unpacks_nothing(site, tmp_path, field):
    server, archive = site
    actual = {"sha256": sha256(archive), "size": archive.stat().st_size}
    wrong = {"sha256": "0" * 64, "size": 12345}
    with pytest.raises(EsclabError, match=f"{field} mismatch") as err:
        prepare_raw(tmp_path / "raw", downloads=tmp_path / "downloads", url=server.url(archive.name),
                    **{field: wrong[field]}, **FAST)
    assert str(wrong[field]) in str(err.value) and str(actual[field]) in str(err.value)
    assert f"dataset.{field}" in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_unpinned_archive_logs_the_values_to_pin(site, caplog):
    _, archive = site
    assert verify(archive, sha256=None, size=None) == sha256(archive)
    assert f"dataset.sha256={sha256(archive)}" in caplog.text
    assert f"dataset.size={archive.stat().st_size}" in caplog.text


def broken_zips(tmp_path: Path) -> dict[str, Path]:
    good = make_zip(tmp_path / "good.zip", FILES).read_bytes()
    payload = good.index(FILES["audio/1-100-A-0.wav"][:64])
    corrupt = bytearray(good)
    corrupt[payload + 1000] ^= 0xFF  # a flipped bit in the stored data: the CRC check must catch it
    paths = {"not-a-zip": b"<html>rate limited</html>", "truncated": good[: len(good) // 2], "bad-crc": corrupt}
    for name, data in paths.items():
        (tmp_path / f"{name}.zip").write_bytes(data)
    return {name: tmp_path / f"{name}.zip" for name in paths}


@pytest.mark.parametrize("kind", ["not-a-zip", "truncated", "bad-crc"])
def test_invalid_zip_is_refused_and_unpacks_nothing(tmp_path, kind):
    archive = broken_zips(tmp_path)[kind]
    with pytest.raises(EsclabError, match="not a valid zip archive") as err:
        unpack(archive, tmp_path / "raw")
    assert str(archive) in str(err.value)
    assert not (tmp_path / "raw").exists() and leftovers(tmp_path) == []


def symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize("bad", ["../x", "ESC-50-master/../../x", "ABSOLUTE", "C:/x", "symlink"])
def test_dangerous_member_is_refused_before_anything_is_extracted(tmp_path, bad):
    name = str(tmp_path / "x") if bad == "ABSOLUTE" else "ESC-50-master/x" if bad == "symlink" else bad
    entry = symlink_entry(name, str(tmp_path / "x")) if bad == "symlink" else (name, b"pwned")
    archive = make_zip(tmp_path / "evil" / "evil.zip", FILES)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(*entry)
    with pytest.raises(EsclabError) as err:
        unpack(archive, tmp_path / "raw")
    assert repr(name) in str(err.value)
    assert not (tmp_path / "raw").exists() and not (tmp_path / "x").exists()
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["evil"]


def test_unpack_replaces_an_existing_dest_completely(tmp_path):
    dest = tmp_path / "raw"
    (dest / "audio").mkdir(parents=True)
    (dest / "audio" / "stale.wav").write_bytes(b"old")
    (dest / "old.txt").write_text("old")
    unpack(make_zip(tmp_path / "a.zip", FILES), dest)
    assert_unpacked(dest)
    assert not (dest / "audio" / "stale.wav").exists() and leftovers(tmp_path) == []


def test_archive_without_a_top_folder_unpacks_the_same(tmp_path):
    unpack(make_zip(tmp_path / "flat.zip", FILES, top=""), tmp_path / "raw")
    assert_unpacked(tmp_path / "raw")


def test_local_archive_is_used_and_checked(tmp_path, closed_port_url):
    archive = make_zip(tmp_path / "mine.zip", FILES)
    prepare_raw(tmp_path / "raw", downloads=tmp_path / "downloads", url=closed_port_url, archive=str(archive),
                sha256=sha256(archive))
    assert_unpacked(tmp_path / "raw")
    with pytest.raises(EsclabError, match="sha256 mismatch"):
        prepare_raw(tmp_path / "raw2", downloads=tmp_path / "downloads", archive=archive, sha256="0" * 64)
    assert not (tmp_path / "downloads").exists() and not (tmp_path / "raw2").exists()


def test_missing_local_archive_names_the_path_and_setting(tmp_path):
    missing = tmp_path / "nowhere" / "ESC-50-master.zip"
    with pytest.raises(EsclabError, match="dataset.archive") as err:
        prepare_raw(tmp_path / "raw", downloads=tmp_path / "downloads", archive=missing)
    assert str(missing) in str(err.value)


def test_nothing_to_prepare_names_the_three_settings(tmp_path):
    with pytest.raises(EsclabError) as err:
        prepare_raw(tmp_path / "raw", downloads=tmp_path / "downloads")
    assert all(s in str(err.value) for s in ("dataset.url", "dataset.archive", "dataset.source_dir"))


def write_tree(root: Path) -> Path:
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_source_dir_is_copied_and_takes_precedence(tmp_path, closed_port_url):
    source = write_tree(tmp_path / "ESC-50-master")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "stale").write_text("old")
    prepare_raw(tmp_path / "raw", downloads=tmp_path / "downloads", url=closed_port_url,
                archive=tmp_path / "missing.zip", source_dir=str(source))
    assert_unpacked(tmp_path / "raw")
    assert leftovers(tmp_path) == []


def test_source_dir_follows_links_as_users_keep_datasets(tmp_path):
    """audio/ on another disk, a file linked from elsewhere: the local folder is the user's to arrange."""
    source = write_tree(tmp_path / "ESC-50-master")
    elsewhere = tmp_path / "other-disk" / "esc50-audio"
    elsewhere.parent.mkdir()
    shutil.move(source / "audio", elsewhere)
    (source / "audio").symlink_to(elsewhere, target_is_directory=True)
    (source / "meta" / "alias.csv").symlink_to(source / "meta" / "esc50.csv")
    copy_tree(source, tmp_path / "raw")
    assert_unpacked(tmp_path / "raw")
    copied = tmp_path / "raw" / "audio"
    assert copied.is_dir() and not copied.is_symlink()  # a real copy, which DVC can cache
    assert (tmp_path / "raw" / "meta" / "alias.csv").read_bytes() == FILES["meta/esc50.csv"]


@pytest.mark.parametrize("bad", ["dangling", "loop"])
def test_source_dir_refuses_a_dangling_link_or_a_loop_by_name(tmp_path, bad):
    source = write_tree(tmp_path / "ESC-50-master")
    link = source / "audio" / ("gone.wav" if bad == "dangling" else "again")
    link.symlink_to(tmp_path / "deleted.wav" if bad == "dangling" else source)
    with pytest.raises(EsclabError, match="dataset.source_dir") as err:
        copy_tree(source, tmp_path / "raw")
    assert str(link) in str(err.value) and not (tmp_path / "raw").exists()


def test_missing_source_dir_is_named(tmp_path):
    with pytest.raises(EsclabError, match="dataset.source_dir") as err:
        copy_tree(tmp_path / "nowhere", tmp_path / "raw")
    assert str(tmp_path / "nowhere") in str(err.value)


@pytest.fixture
def little_free_space(monkeypatch):
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))


def test_download_refused_when_the_disk_is_too_full(site, tmp_path, little_free_space):
    server, archive = site
    downloads = tmp_path / "downloads"
    with pytest.raises(EsclabError, match="disk space") as err:
        prepare_raw(tmp_path / "raw", downloads=downloads, url=server.url(archive.name), **FAST)
    assert str(downloads) in str(err.value) and str(archive.stat().st_size) in str(err.value)
    assert list(downloads.iterdir()) == [] and len(server.requests) == 1


def test_unpack_refused_when_the_disk_is_too_full(tmp_path, little_free_space):
    archive = make_zip(tmp_path / "zips" / "a.zip", FILES)
    with pytest.raises(EsclabError, match="disk space") as err:
        unpack(archive, tmp_path / "data" / "raw")
    assert str(tmp_path / "data") in str(err.value)
    assert list((tmp_path / "data").iterdir()) == []



# UrbanSound8K's archive: a tar.gz with one top folder, folders as entries of their own.
def make_tar(path: Path, files: dict[str, bytes], top: str = "UrbanSound8K", extra: tuple = ()) -> Path:
    """A tar of `files` under `top` (gzipped if `path` ends in gz), then the `extra` TarInfo entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folders = sorted({"/".join([top, *name.split("/")[:depth]]).strip("/")
                      for name in files for depth in range(name.count("/") + 1)} - {""})
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tf:
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}".lstrip("/"))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


@pytest.mark.parametrize("name", ["UrbanSound8K.tar.gz", "dataset.tgz", "plain.tar", "no-suffix"])
def test_tar_is_unpacked_with_its_top_folder_dropped(tmp_path, name):
    archive = make_tar(tmp_path / "tars" / name, FILES)
    if name == "no-suffix":  # told by its content, not its name
        archive = make_tar(tmp_path / "tars" / "x.tar.gz", FILES).rename(archive)
    unpack(archive, tmp_path / "raw")
    assert_unpacked(tmp_path / "raw")
    assert leftovers(tmp_path) == []


def test_tar_without_a_top_folder_unpacks_the_same(tmp_path):
    unpack(make_tar(tmp_path / "flat.tar.gz", FILES, top=""), tmp_path / "raw")
    assert_unpacked(tmp_path / "raw")


def tar_entry(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("bad, problem", [
    ("absolute", "an absolute path"), ("dotdot", "a '..' component"), ("symlink", "a symbolic link"),
    ("hardlink", "a hard link"), ("device", "a device file"), ("fifo", "a FIFO"),
])
def test_dangerous_tar_member_is_refused_before_anything_is_extracted(tmp_path, bad, problem):
    outside = str(tmp_path / "x")
    entry = {
        "absolute": tar_entry(outside, tarfile.REGTYPE),
        "dotdot": tar_entry("UrbanSound8K/../../x", tarfile.REGTYPE),
        "symlink": tar_entry("UrbanSound8K/audio/link.wav", tarfile.SYMTYPE, outside),
        "hardlink": tar_entry("UrbanSound8K/audio/link.wav", tarfile.LNKTYPE, "UrbanSound8K/meta/esc50.csv"),
        "device": tar_entry("UrbanSound8K/audio/null", tarfile.CHRTYPE),
        "fifo": tar_entry("UrbanSound8K/audio/pipe", tarfile.FIFOTYPE),
    }[bad]
    archive = make_tar(tmp_path / "evil" / "evil.tar.gz", FILES, extra=(entry,))
    with pytest.raises(EsclabError) as err:
        unpack(archive, tmp_path / "raw")
    message = str(err.value)
    assert f"{archive} member {entry.name!r} is {problem}" in message and "\n" not in message
    assert not (tmp_path / "raw").exists() and not (tmp_path / "x").exists()
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["evil"]


@pytest.mark.parametrize("cut", ["mid-member", "trailer", "plain tar between members"])
def test_truncated_tar_is_refused_in_one_line_and_unpacks_nothing(tmp_path, cut):
    plain = cut.startswith("plain")
    good = make_tar(tmp_path / ("good.tar" if plain else "good.tar.gz"), FILES).read_bytes()
    if plain:  # cut right after the last member, before the end-of-archive blocks: tarfile alone would not notice
        with tarfile.open(tmp_path / "good.tar") as tf:
            last = tf.getmembers()[-1]
        keep = last.offset_data + tarfile.BLOCKSIZE * -(-last.size // tarfile.BLOCKSIZE)  # its data, padded
    else:
        keep = len(good) // 2 if cut == "mid-member" else len(good) - 4
    archive = tmp_path / ("cut.tar" if plain else "cut.tar.gz")
    archive.write_bytes(good[:keep])
    with pytest.raises(EsclabError, match="not a valid tar archive") as err:
        unpack(archive, tmp_path / "raw")
    message = str(err.value)
    assert str(archive) in message and "delete it and rerun" in message and "\n" not in message
    assert not (tmp_path / "raw").exists() and leftovers(tmp_path) == []


def test_tar_gz_url_is_downloaded_resumed_verified_and_unpacked(tmp_path):
    archive = make_tar(tmp_path / "www" / "UrbanSound8K.tar.gz", FILES)
    with ArchiveServer(archive.parent) as server:
        server.drop_after(archive.stat().st_size // 2)
        prepare_raw(tmp_path / "raw", downloads=tmp_path / "downloads", url=server.url(archive.name),
                    sha256=sha256(archive), size=archive.stat().st_size, **FAST)
    assert_unpacked(tmp_path / "raw")
    assert len(server.requests) == 2 and server.requests[1][1] not in (None, "bytes=0-")  # resumed mid-file
    assert (tmp_path / "downloads" / archive.name).read_bytes() == archive.read_bytes()
