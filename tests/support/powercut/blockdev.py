"""Crash states of a block device without a power switch.

The cache directory lives on an ext4 file system made on an image file attached through a
loop device with direct I/O (``losetup --direct-io=on``). That image file lives on an XFS
file system (made on a second image, loop-mounted) that supports reflinks, so
``cp --reflink=always`` of the ext4 image is a copy-on-write clone taken under XFS's
inode locks: every write the loop device has completed is in it, none is half in it, and
the page cache of the ext4 file system is not in it at all. That is what a power cut
leaves: what the device acknowledged, nothing more. A clone is mounted on another loop
device; ext4 replays its journal exactly as after a reboot.

Why direct I/O on the loop device: without it the loop driver writes into XFS's page
cache, and a clone would also hold writes the device accepted but had not been asked to
flush (the clone writes XFS's dirty pages back first). That is still a possible crash
state (a disk may persist more than it was asked to) but a kinder one; with direct I/O
the clone holds what reached the backing file when the device acknowledged it.

Everything here needs root, ``losetup``, ``mkfs.ext4``, ``mkfs.xfs`` (xfsprogs) and a
kernel with XFS; ``missing_capability()`` says what is missing so the test can skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CacheDevice", "Snapshot", "missing_capability"]


def _run(*args: str, timeout: float = 60.0) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def missing_capability() -> str | None:
    """Why this machine cannot run the crash-state harness, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (loop devices and mounts)"
    for tool in ("losetup", "mkfs.ext4", "mkfs.xfs", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install xfsprogs util-linux e2fsprogs)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop devices unavailable)"
    with open("/proc/filesystems") as f:
        kinds = {line.split()[-1] for line in f if line.strip()}
    for kind in ("xfs", "ext4"):
        if kind not in kinds:
            return f"the kernel has no {kind} (modprobe {kind})"
    return None


def _attach(image: Path, direct_io: bool) -> str:
    args = ["losetup", "--find", "--show"]
    if direct_io:
        args.append("--direct-io=on")
    return _run(*args, str(image)).strip()


def _detach(device: str) -> None:
    with contextlib.suppress(RuntimeError):
        _run("losetup", "-d", device)


def _umount(path: Path) -> None:
    with contextlib.suppress(RuntimeError):
        _run("umount", str(path))


class Snapshot:
    """A clone of the cache device taken at one instant, mountable as a crash state."""

    def __init__(self, image: Path, mountpoint: Path) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self._device: str | None = None

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Path]:
        """Attach and mount the clone (ext4 replays its journal); yield the mount point."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._device = _attach(self.image, direct_io=False)
        try:
            _run("mount", "-t", "ext4", self._device, str(self.mountpoint))
            try:
                yield self.mountpoint
            finally:
                _umount(self.mountpoint)
        finally:
            _detach(self._device)
            self._device = None

    def discard(self) -> None:
        self.image.unlink(missing_ok=True)


class CacheDevice:
    """An ext4 file system on a loop device whose image sits on a reflink-capable XFS."""

    def __init__(self, root: Path, *, xfs_size: str = "3G", ext4_size: str = "768M") -> None:
        self.root = root
        self.xfs_image = root / "xfs.img"
        self.xfs_mount = root / "xfs"
        self.ext4_image = self.xfs_mount / "cache.img"
        self.mountpoint = root / "cache"
        self.xfs_size = xfs_size
        self.ext4_size = ext4_size
        self.device: str | None = None
        self._xfs_device: str | None = None
        self._snapshots = 0

    def __enter__(self) -> CacheDevice:
        self.root.mkdir(parents=True, exist_ok=True)
        self.xfs_mount.mkdir(exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        _run("truncate", "-s", self.xfs_size, str(self.xfs_image))
        _run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(self.xfs_image))
        self._xfs_device = _attach(self.xfs_image, direct_io=False)
        try:
            _run("mount", "-t", "xfs", self._xfs_device, str(self.xfs_mount))
            _run("truncate", "-s", self.ext4_size, str(self.ext4_image))
            _run("mkfs.ext4", "-q", "-F", str(self.ext4_image))
            self.device = _attach(self.ext4_image, direct_io=True)
            _run("mount", "-t", "ext4", self.device, str(self.mountpoint))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def snapshot(self) -> Snapshot:
        """Clone the ext4 image as it is on the device right now (the page cache is not in
        it: that is the power cut)."""
        self._snapshots += 1
        clone = self.xfs_mount / f"cut-{self._snapshots}.img"
        _run("cp", "--reflink=always", str(self.ext4_image), str(clone))
        return Snapshot(clone, self.root / f"cut-{self._snapshots}")

    def __exit__(self, *exc: object) -> None:
        _umount(self.mountpoint)
        if self.device is not None:
            _detach(self.device)
            self.device = None
        _umount(self.xfs_mount)
        if self._xfs_device is not None:
            _detach(self._xfs_device)
            self._xfs_device = None
        self.xfs_image.unlink(missing_ok=True)
