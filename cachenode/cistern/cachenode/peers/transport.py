"""Which transport carries peer traffic, and why (RDMA device detection).

RDMA needs three things: the kernel's RDMA subsystem with a device (``/sys/class/infiniband``
lists one per RDMA-capable port, InfiniBand or RoCE), the ``pyverbs`` bindings (rdma-core), and
a device pyverbs can open with an active port. Each missing piece is the reason reported in
``/status``, ``/metrics`` and the WriteCache status; the node then uses TCP. With all of them,
peer reads go through one-sided RDMA READs (``verbs.VerbsEngine``, ``regions.RegionReads``)
and a reader that cannot use RDMA with one member falls back to TCP for it
(``RegionReads.fell_back``), which the status reason shows too.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from cistern.cachenode.peers.protocol import PeerError
from cistern.cachenode.peers.regions import Engine

__all__ = ["SYSFS_RDMA", "TransportChoice", "choose_transport", "detect_rdma", "open_engine"]

SYSFS_RDMA = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class TransportChoice:
    name: str
    """``tcp`` or ``rdma`` (peer reads through one-sided RDMA READs)."""
    reason: str
    """Why this transport: shown in /status, /metrics and the WriteCache status."""
    rdma_devices: tuple[str, ...] = ()


def detect_rdma(sysfs: Path = SYSFS_RDMA, module: str = "pyverbs.device") \
        -> tuple[tuple[str, ...], str]:
    """(devices found, reason when none is usable: '' if one is)."""
    try:
        names = tuple(sorted(p.name for p in sysfs.iterdir()))
    except FileNotFoundError:
        return (), (f"no RDMA device: {sysfs} does not exist (the kernel has no InfiniBand/"
                    "RDMA support loaded)")
    except OSError as exc:
        return (), f"no RDMA device: {sysfs}: {exc.strerror}"
    if not names:
        return (), f"no RDMA device: {sysfs} is empty"
    try:
        verbs = importlib.import_module(module)
    except ImportError as exc:
        return names, f"RDMA devices {', '.join(names)} but pyverbs is not importable ({exc})"
    try:
        listed = verbs.get_device_list()
    except Exception as exc:  # pyverbs raises its own PyverbsError types
        return names, f"RDMA devices {', '.join(names)} but pyverbs cannot list them ({exc})"
    if not listed:
        return names, f"RDMA devices {', '.join(names)} but pyverbs lists none"
    return names, ""


def choose_transport(wanted: str, sysfs: Path = SYSFS_RDMA,
                     module: str = "pyverbs.device") -> TransportChoice:
    if wanted == "tcp":
        return TransportChoice("tcp", "configured: peers.transport is tcp")
    devices, problem = detect_rdma(sysfs, module)
    if problem:
        return TransportChoice("tcp", f"fallback to TCP: {problem}", devices)
    return TransportChoice("rdma", f"RDMA devices {', '.join(devices)} usable (pyverbs)",
                           devices)


def open_engine(choice: TransportChoice) -> tuple[Engine | None, TransportChoice]:
    """The verbs engine on the first device when RDMA was chosen; TCP and why if it cannot
    be opened (no active port, no GID, no memory for the protection domain...)."""
    if choice.name != "rdma":
        return None, choice
    from cistern.cachenode.peers.verbs import VerbsEngine

    device = choice.rdma_devices[0]
    try:
        return VerbsEngine(device), choice
    except (PeerError, ImportError) as exc:
        return None, TransportChoice("tcp", f"fallback to TCP: {exc}", choice.rdma_devices)
