"""POSIX behaviour the training frameworks and everyday tools rely on, on a real mount."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from support.frontends import ON_ALL_FRONTENDS
from support.s3server import list_keys, read_object

pytestmark = ON_ALL_FRONTENDS


@pytest.fixture
def node(make_node: Any, bucket: str) -> Any:
    return make_node(bucket)


def test_create_write_read_stat(node: Any, s3: Any, bucket: str) -> None:
    path = node.mount / "a.bin"
    data = os.urandom(300_000)
    path.write_bytes(data)
    assert path.read_bytes() == data
    st = path.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_size == len(data)
    node.flush()
    assert read_object(s3, bucket, "a.bin") == data
    fuse = node.status().fuse  # the front end in use says so, with its own counters
    assert fuse.frontend == node.frontend
    assert fuse.passthrough is (node.frontend == "passthrough")


def test_random_offset_writes_and_sparse_holes(node: Any, s3: Any, bucket: str) -> None:
    path = node.mount / "random.bin"
    expected = bytearray(1_000_000)
    with open(path, "wb+") as f:
        for offset in (900_000, 0, 123_457, 500_000, 999_990):
            chunk = os.urandom(10)
            f.seek(offset)
            f.write(chunk)
            expected[offset:offset + 10] = chunk
    assert path.read_bytes() == bytes(expected)
    node.flush()
    assert read_object(s3, bucket, "random.bin") == bytes(expected)


def test_truncate_and_ftruncate(node: Any, s3: Any, bucket: str) -> None:
    path = node.mount / "t.bin"
    path.write_bytes(b"x" * 10_000)
    os.truncate(path, 100)
    assert path.stat().st_size == 100
    with open(path, "r+b") as f:
        os.ftruncate(f.fileno(), 5000)
        f.seek(4999)
        f.write(b"y")
    content = path.read_bytes()
    assert content == b"x" * 100 + b"\0" * 4899 + b"y"
    node.flush()
    assert read_object(s3, bucket, "t.bin") == content


def test_fsync_and_append(node: Any) -> None:
    path = node.mount / "log.txt"
    with open(path, "a") as f:
        f.write("one\n")
        f.flush()
        os.fsync(f.fileno())
    with open(path, "a") as f:
        f.write("two\n")
        os.fdatasync(f.fileno())
    assert path.read_text() == "one\ntwo\n"


def test_directories_readdir_rmdir(node: Any, s3: Any, bucket: str) -> None:
    base = node.mount / "ckpt" / "step-1"
    base.mkdir(parents=True)
    for i in range(5):
        (base / f"shard-{i}.pt").write_bytes(bytes([i]) * 10)
    assert sorted(os.listdir(base)) == [f"shard-{i}.pt" for i in range(5)]
    assert sorted(os.listdir(node.mount)) == ["ckpt"]
    with pytest.raises(OSError) as info:
        os.rmdir(base)
    assert info.value.errno == errno.ENOTEMPTY
    empty = node.mount / "empty"
    empty.mkdir()
    os.rmdir(empty)
    assert not empty.exists()
    with pytest.raises(FileExistsError):
        os.mkdir(base)
    with pytest.raises(FileNotFoundError):
        os.stat(node.mount / "missing")
    node.flush()
    assert set(list_keys(s3, bucket)) == {f"ckpt/step-1/shard-{i}.pt" for i in range(5)}


def test_unlink(node: Any, s3: Any, bucket: str) -> None:
    path = node.mount / "gone.bin"
    path.write_bytes(b"data")
    node.flush()
    assert "gone.bin" in list_keys(s3, bucket)
    path.unlink()
    assert not path.exists()
    node.flush()
    assert "gone.bin" not in list_keys(s3, bucket)


def test_rename_file_and_directory_after_upload(node: Any, s3: Any, bucket: str) -> None:
    (node.mount / "d1" / "sub").mkdir(parents=True)
    (node.mount / "d1" / "a").write_bytes(b"A")
    (node.mount / "d1" / "sub" / "b").write_bytes(b"B")
    (node.mount / "f").write_bytes(b"F")
    node.flush()
    os.rename(node.mount / "d1", node.mount / "d2")
    os.rename(node.mount / "f", node.mount / "d2" / "f2")
    assert (node.mount / "d2" / "sub" / "b").read_bytes() == b"B"
    assert (node.mount / "d2" / "f2").read_bytes() == b"F"
    assert not (node.mount / "d1").exists()
    node.flush()
    assert list_keys(s3, bucket) == {"d2/a": 1, "d2/sub/b": 1, "d2/f2": 1}
    assert read_object(s3, bucket, "d2/sub/b") == b"B"


def test_rename_over_existing_and_noreplace(node: Any, s3: Any, bucket: str) -> None:
    (node.mount / "old").write_bytes(b"old")
    node.flush()
    (node.mount / "new.tmp").write_bytes(b"new")
    os.replace(node.mount / "new.tmp", node.mount / "old")
    assert (node.mount / "old").read_bytes() == b"new"
    node.flush()
    assert list_keys(s3, bucket) == {"old": 3}
    assert read_object(s3, bucket, "old") == b"new"
    with pytest.raises(OSError) as info:
        os.rename(node.mount / "old", node.mount / "old/x")
    assert info.value.errno in (errno.ENOTDIR, errno.ENOENT)


def test_large_sparse_file_over_2gib(node: Any) -> None:
    path = node.mount / "huge.bin"
    size = 2 * 2**30 + 4096
    with open(path, "wb") as f:
        f.seek(size - 5)
        f.write(b"tail!")
    assert path.stat().st_size == size
    with open(path, "rb") as f:
        f.seek(size - 5)
        assert f.read() == b"tail!"
        f.seek(2**30)
        assert f.read(4) == b"\0\0\0\0"


def test_many_small_files(node: Any, s3: Any, bucket: str) -> None:
    folder = node.mount / "many"
    folder.mkdir()
    for i in range(300):
        (folder / f"f{i:04d}").write_text(str(i))
    assert len(os.listdir(folder)) == 300
    node.flush()
    keys = list_keys(s3, bucket, "many/")
    assert len(keys) == 300
    assert read_object(s3, bucket, "many/f0299") == b"299"


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (
            stat.S_IMODE(st.st_mode), st.st_mtime_ns // 10**9 if path.is_file() else 0,
            path.read_bytes() if path.is_file() else b"")
    return out


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "inner" / "b.bin").write_bytes(os.urandom(70_000))
    os.chmod(src / "a.txt", 0o640)
    os.chmod(src / "inner" / "b.bin", 0o600)
    os.utime(src / "a.txt", (1_600_000_000, 1_600_000_000))
    return src


def test_cp_a_keeps_modes_and_times(node: Any, source_tree: Path) -> None:
    subprocess.run(["cp", "-a", str(source_tree), str(node.mount / "copy")], check=True)
    assert _tree(node.mount / "copy") == _tree(source_tree)


def test_rsync_archive(node: Any, source_tree: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed on this machine")
    subprocess.run(["rsync", "-a", f"{source_tree}/", str(node.mount / "r")], check=True,
                   capture_output=True)
    assert _tree(node.mount / "r") == _tree(source_tree)
    again = subprocess.run(["rsync", "-a", "--itemize-changes", f"{source_tree}/",
                            str(node.mount / "r")], check=True, capture_output=True, text=True)
    assert again.stdout.strip() == "", "a second rsync found differences"


def test_tar_roundtrip(node: Any, source_tree: Path, tmp_path: Path, s3: Any,
                       bucket: str) -> None:
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source_tree, arcname="tree")
    subprocess.run(["tar", "-xpf", str(archive), "-C", str(node.mount)], check=True)
    assert _tree(node.mount / "tree") == _tree(source_tree)
    out = tmp_path / "back.tar"
    subprocess.run(["tar", "-cf", str(out), "-C", str(node.mount), "tree"], check=True)
    node.flush()
    head = s3.head_object(Bucket=bucket, Key="tree/a.txt")
    assert head["Metadata"]["mode"] == "0o640"


def test_chmod_chown_utime(node: Any, s3: Any, bucket: str) -> None:
    path = node.mount / "perm"
    path.write_text("x")
    node.flush()
    os.chmod(path, 0o600)
    os.chown(path, 1234, 4321)
    os.utime(path, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1234, 4321)
    assert st.st_mtime_ns == 1_500_000_000_000_000_000
    node.flush()
    meta = s3.head_object(Bucket=bucket, Key="perm")["Metadata"]
    assert meta["mode"] == "0o600" and meta["uid"] == "1234"
    assert meta["mtime-ns"] == "1500000000000000000"


def test_bad_names_and_unsupported_ops(node: Any) -> None:
    with pytest.raises(OSError) as info:
        os.symlink("target", node.mount / "link")
    assert info.value.errno == errno.EPERM
    (node.mount / "f").write_text("x")
    with pytest.raises(OSError) as info:
        os.link(node.mount / "f", node.mount / "g")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        (node.mount / ("n" * 300)).write_text("x")
    assert info.value.errno == errno.ENAMETOOLONG
