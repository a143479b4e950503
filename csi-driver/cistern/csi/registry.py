"""What CreateVolume has provisioned, so that a repeated name is answered by the spec.

A Cistern volume costs nothing until it is published, so CreateVolume would be a pure function
of its request but for one rule of the spec: the same name with an incompatible capacity (or
other parameters) is ALREADY_EXISTS. The registry remembers each name's volume id and
capacity, in memory and, when given a file, across restarts (written atomically).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass

from cistern.csi.errors import AlreadyExists

__all__ = ["Provisioned", "VolumeRegistry"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provisioned:
    volume_id: str
    capacity: int


def fits(capacity: int, required: int, limit: int) -> bool:
    """Whether an existing volume of ``capacity`` bytes satisfies a capacity range."""
    return capacity >= required and (limit == 0 or capacity <= limit)


class VolumeRegistry:
    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._volumes: dict[str, Provisioned] = {}
        if path and os.path.exists(path):
            try:
                with open(path) as file:
                    data = json.load(file)
                self._volumes = {name: Provisioned(str(v["volumeId"]), int(v["capacity"]))
                                 for name, v in data.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("volume registry %s is unreadable (%s); starting empty", path, exc)

    def claim(self, name: str, volume_id: str, capacity: int, required: int,
              limit: int) -> Provisioned:
        """Record ``name``; the volume to report (the existing one on a compatible repeat)."""
        with self._lock:
            existing = self._volumes.get(name)
            if existing is not None:
                if existing.volume_id != volume_id:
                    raise AlreadyExists(f"volume {name!r} exists as {existing.volume_id}, not "
                                        f"{volume_id} (different parameters)")
                if not fits(existing.capacity, required, limit):
                    raise AlreadyExists(f"volume {name!r} exists with capacity "
                                        f"{existing.capacity} bytes, which does not fit "
                                        f"required {required} / limit {limit or 'none'}")
                return existing
            made = Provisioned(volume_id, capacity)
            self._volumes[name] = made
            self._save()
            return made

    def forget(self, volume_id: str) -> None:
        with self._lock:
            names = [n for n, v in self._volumes.items() if v.volume_id == volume_id]
            for name in names:
                del self._volumes[name]
            if names:
                self._save()

    def _save(self) -> None:
        if not self.path:
            return
        data = {n: {"volumeId": v.volume_id, "capacity": v.capacity}
                for n, v in self._volumes.items()}
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".registry-")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(data, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
