"""What a kubelet does before it starts a container: volumes, env, paths (no processes here).

A container runs as a local process, so it sees the host's file system. Each volume is
materialised under the pod's directory (or, for a hostPath, under the per-test root's
``host/``), and the container's view of paths is translated to those directories in its
command, args, env values and the ConfigMap files it mounts: ``--endpoint=unix:///csi/csi.sock``
becomes ``unix://<root>/host/var/lib/kubelet/plugins/csi.cistern.dev/csi.sock``. The pod's
network namespace is modelled by a loopback pod IP: a wildcard bind (``0.0.0.0:P``, ``:P``)
becomes ``<podIP>:P``. Device hostPaths (``/dev/...``) are the host's own.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.kubelet.apiclient import ApiClient

__all__ = ["ContainerPlan", "PodContext", "PodError", "plan_containers", "prepare_volumes"]


class PodError(Exception):
    """The pod cannot start; ``reason`` is what the kubelet would show (e.g.
    ``CreateContainerConfigError``), the message says why in one line."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class PodContext:
    """One pod on this node: its identity and where its files live."""

    pod: dict[str, Any]
    node_name: str
    pod_ip: str
    root: Path
    """The per-test root: hostPaths live under ``root/host``, pods under ``root/pods``."""
    api: ApiClient
    kubeconfig: Path
    publish: Callable[[dict[str, Any], dict[str, Any]], Path] | None = None
    """The kubelet's CSI publish for a PVC or inline CSI volume (pod, volume) -> host path."""

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"].get("namespace") or "default")

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.pod["spec"])

    @property
    def pod_dir(self) -> Path:
        return self.root / "pods" / self.uid

    def host_path(self, path: str) -> Path:
        """A hostPath as this node sees it: under the test root, except devices."""
        if path.startswith("/dev/"):
            return Path(path)
        return self.root / "host" / path.lstrip("/")


@dataclass
class ContainerPlan:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    mounts: dict[str, Path]
    """Container path -> host path (longest first when translating)."""
    ports: dict[str, int]
    readiness: dict[str, Any] | None
    liveness: dict[str, Any] | None
    startup: dict[str, Any] | None
    spec: dict[str, Any] = field(default_factory=dict)


def _mode(value: Any, default: int) -> int:
    return default if value is None else int(value)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write one projected key; unchanged keys are left alone, changed ones replaced at once
    (a reader sees the old or the new content, as with a kubelet's atomic writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.read_bytes() == data and path.stat().st_mode & 0o7777 == mode:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _project_keys(target: Path, data: Mapping[str, bytes], items: list[dict[str, Any]] | None,
                  default_mode: int, what: str, optional: bool) -> None:
    if items:
        for item in items:
            if item["key"] not in data:
                if optional:
                    continue
                raise PodError("FailedMount", f"{what}: no key {item['key']!r}")
            _write(target / item["path"], data[item["key"]], _mode(item.get("mode"),
                                                                   default_mode))
    else:
        for key, value in data.items():
            _write(target / key, value, default_mode)


def _configmap_data(ctx: PodContext, name: str) -> dict[str, bytes] | None:
    cm = ctx.api.get("configmaps", name, ctx.namespace)
    if cm is None:
        return None
    data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
    return data


def _secret_data(ctx: PodContext, name: str) -> dict[str, bytes] | None:
    secret = ctx.api.get("secrets", name, ctx.namespace)
    if secret is None:
        return None
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


_HOSTPATH_CHECKS: dict[str, tuple[Callable[[Path], bool], str]] = {
    "Directory": (Path.is_dir, "is not a directory"),
    "File": (Path.is_file, "is not a file"),
    "Socket": (Path.is_socket, "is not a socket file"),
    "CharDevice": (Path.is_char_device, "is not a character device"),
    "BlockDevice": (Path.is_block_device, "is not a block device"),
}


def _host_path_volume(ctx: PodContext, name: str, source: dict[str, Any]) -> Path:
    path = ctx.host_path(source["path"])
    kind = source.get("type") or ""
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True, mode=0o755)
    elif kind == "FileOrCreate":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o644, exist_ok=True)
    elif kind in _HOSTPATH_CHECKS:
        check, problem = _HOSTPATH_CHECKS[kind]
        if not check(path):
            raise PodError("FailedMount", f"MountVolume.SetUp failed for volume {name!r}: "
                           f"hostPath type check failed: {source['path']} {problem}")
    return path


def _field_ref(ctx: PodContext, path: str) -> str:
    meta = ctx.pod["metadata"]
    values = {
        "spec.nodeName": ctx.node_name, "metadata.name": ctx.name,
        "metadata.namespace": ctx.namespace, "metadata.uid": ctx.uid,
        "status.podIP": ctx.pod_ip, "status.hostIP": "127.0.0.1",
        "spec.serviceAccountName": ctx.spec.get("serviceAccountName") or "default",
    }
    if path in values:
        return values[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise PodError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")


def _project_source(ctx: PodContext, volume: str, kind: str, name: str, src: dict[str, Any],
                    base: Path, default_mode: int) -> None:
    """Project a ConfigMap or Secret (``kind``) into ``base``; FailedMount as a kubelet says."""
    data = _configmap_data(ctx, name) if kind == "configmap" else _secret_data(ctx, name)
    if data is None and not src.get("optional"):
        raise PodError("FailedMount", f"MountVolume.SetUp failed for volume {volume!r}: "
                       f"{kind} {name!r} not found")
    _project_keys(base, data or {}, src.get("items"), default_mode, f"{kind} {name!r}",
                  bool(src.get("optional")))


def prepare_volumes(ctx: PodContext) -> dict[str, Path]:
    """Materialise every volume of the pod; raise PodError as a kubelet's FailedMount would."""
    result: dict[str, Path] = {}
    for volume in ctx.spec.get("volumes") or []:
        name = volume["name"]
        base = ctx.pod_dir / "volumes" / name
        if "hostPath" in volume:
            result[name] = _host_path_volume(ctx, name, volume["hostPath"])
        elif "emptyDir" in volume:
            base.mkdir(parents=True, exist_ok=True)
            result[name] = base
        elif "configMap" in volume:
            src = volume["configMap"]
            _project_source(ctx, name, "configmap", src["name"], src, base,
                            _mode(src.get("defaultMode"), 0o644))
            result[name] = base
        elif "secret" in volume:
            src = volume["secret"]
            _project_source(ctx, name, "secret", src["secretName"], src, base,
                            _mode(src.get("defaultMode"), 0o644))
            result[name] = base
        elif "projected" in volume:
            _projected(ctx, name, volume["projected"], base)
            result[name] = base
        elif "persistentVolumeClaim" in volume or "csi" in volume:
            if ctx.publish is None:
                raise PodError("FailedMount", f"volume {name!r}: no CSI publisher on this node")
            result[name] = ctx.publish(ctx.pod, volume)
        else:
            raise PodError("FailedMount", f"volume {name!r}: unsupported source "
                           f"{sorted(set(volume) - {'name'})}")
    return result


def _translated(translate: Translator, value: bytes) -> bytes:
    try:
        return translate.text(value.decode()).encode()
    except UnicodeDecodeError:
        return value


def refresh_volumes(ctx: PodContext, volumes: Mapping[str, Path]) -> None:
    """Project the pod's ConfigMap and Secret volumes again, as a kubelet's periodic sync does
    (a real kubelet within about a minute; the operator writes objects, such as the CSI access
    policies, that pods started earlier must come to see). Keys that left the object leave the
    volume; a source that is gone now keeps its last files, as a kubelet does."""
    for volume in ctx.spec.get("volumes") or []:
        name = volume["name"]
        base = volumes.get(name)
        if base is None:
            continue
        if "configMap" in volume or "secret" in volume:
            src = volume.get("configMap") or volume["secret"]
            data = (_configmap_data(ctx, src["name"]) if "configMap" in volume
                    else _secret_data(ctx, src["secretName"]))
            if data is None:
                continue
            if "configMap" in volume:  # translated as at the start (plan_containers)
                translate = _file_translator(ctx, volumes)
                data = {k: _translated(translate, v) for k, v in data.items()}
            what = f"volume {name!r}"
            try:
                _project_keys(base, data, src.get("items"), _mode(src.get("defaultMode"),
                              0o644), what, True)
            except OSError:
                continue  # the container may be removing its pod directory right now
            if not src.get("items"):
                for stale in base.iterdir():
                    if stale.is_file() and stale.name not in data:
                        stale.unlink(missing_ok=True)


def _projected(ctx: PodContext, name: str, spec: dict[str, Any], base: Path) -> None:
    default_mode = _mode(spec.get("defaultMode"), 0o644)
    for source in spec.get("sources") or []:
        if "serviceAccountToken" in source:
            # The emulator checks no token; the pod's API access is the kubeconfig in its env.
            _write(base / source["serviceAccountToken"]["path"], b"test-token", default_mode)
        elif "configMap" in source:
            src = source["configMap"]
            _project_source(ctx, name, "configmap", src["name"], src, base, default_mode)
        elif "secret" in source:
            src = source["secret"]
            _project_source(ctx, name, "secret", src["name"], src, base, default_mode)
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                _write(base / item["path"],
                       _field_ref(ctx, item["fieldRef"]["fieldPath"]).encode(),
                       _mode(item.get("mode"), default_mode))


class Translator:
    """Container paths and wildcard binds -> what the local process must use instead."""

    def __init__(self, mounts: Mapping[str, Path], pod_ip: str) -> None:
        self.mounts = sorted(mounts.items(), key=lambda kv: -len(kv[0]))
        self.pod_ip = pod_ip

    def path(self, path: str) -> str:
        for container_path, host in self.mounts:
            cp = container_path.rstrip("/") or "/"
            if path == cp or path.startswith(cp + "/"):
                return str(host) + path[len(cp):]
        return path

    def text(self, value: str) -> str:
        for container_path, host in self.mounts:
            cp = re.escape(container_path.rstrip("/"))
            # A whole path component, after a delimiter ("=", ":", space, "unix://", ...).
            pattern = rf"(?:(?<=^)|(?<=[\s=:\"',\[(])|(?<=://)){cp}(?=/|$|[^\w.-])"
            replacement = str(host).replace("\\", "\\\\")
            value = re.sub(pattern, replacement, value, flags=re.MULTILINE)
        value = re.sub(r"(?<![\d.])0\.0\.0\.0(?![\d.])", self.pod_ip, value)
        return value

    def arg(self, value: str) -> str:
        value = re.sub(r"^(--[\w-]+=|)(:\d+)$", rf"\g<1>{self.pod_ip}\g<2>", value)
        return self.text(value)


def _expand(value: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion (``$$`` escapes; unknown references stay)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  value)


def _env(ctx: PodContext, container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            data = _configmap_data(ctx, ref["name"])
            if data is None and not ref.get("optional"):
                raise PodError("CreateContainerConfigError",
                               f"configmap {ref['name']!r} not found")
        else:
            ref = source["secretRef"]
            data = _secret_data(ctx, ref["name"])
            if data is None and not ref.get("optional"):
                raise PodError("CreateContainerConfigError",
                               f"secret {ref['name']!r} not found")
        env.update({prefix + k: v.decode() for k, v in (data or {}).items()})
    for var in container.get("env") or []:
        name, source = var["name"], var.get("valueFrom")
        if source is None:
            env[name] = _expand(str(var.get("value", "")), env)
        elif "fieldRef" in source:
            env[name] = _field_ref(ctx, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            secret = "secretKeyRef" in source
            ref = source["secretKeyRef" if secret else "configMapKeyRef"]
            data = (_secret_data if secret else _configmap_data)(ctx, ref["name"])
            kind = "secret" if secret else "configmap"
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                problem = (f"{kind} {ref['name']!r} not found" if data is None else
                           f"couldn't find key {ref['key']} in {kind} "
                           f"{ctx.namespace}/{ref['name']}")
                raise PodError("CreateContainerConfigError", problem)
            env[name] = data[ref["key"]].decode()
        else:
            raise PodError("CreateContainerConfigError",
                           f"env {name}: unsupported valueFrom {sorted(source)}")
    return env


def _file_translator(ctx: PodContext, volumes: Mapping[str, Path]) -> Translator:
    """The translator for ConfigMap files: every container's mounts of the pod."""
    all_mounts: dict[str, Path] = {}
    for container in ctx.spec.get("containers") or []:
        for mount in container.get("volumeMounts") or []:
            if mount["name"] in volumes:  # a dangling mount is reported per container
                all_mounts.setdefault(mount["mountPath"], volumes[mount["name"]]
                                      / mount.get("subPath", ""))
    return Translator(all_mounts, ctx.pod_ip)


def plan_containers(ctx: PodContext, volumes: Mapping[str, Path], base_env: Mapping[str, str],
                    image_command: Callable[[dict[str, Any]], list[str] | None]
                    ) -> list[ContainerPlan]:
    """Each container's process: argv, env, working directory, probes (paths translated).

    ``image_command(container)`` is the image's entry point when the container has no
    ``command`` (a test double for third-party images), None when the image is ours.
    """
    plans = []
    # ConfigMap files are read by the programs; translate them with the pod's mounts.
    translate_files = _file_translator(ctx, volumes)
    for volume in ctx.spec.get("volumes") or []:
        if "configMap" in volume:
            for file in volumes[volume["name"]].rglob("*"):
                if file.is_file():
                    mode = file.stat().st_mode & 0o7777
                    file.write_text(translate_files.text(file.read_text()))
                    file.chmod(mode)
    for container in ctx.spec.get("containers") or []:
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                raise PodError("CreateContainerConfigError",
                               f"container {container['name']!r}: volumeMount "
                               f"{mount['name']!r} names no volume of the pod")
            mounts[mount["mountPath"]] = volumes[mount["name"]] / mount.get("subPath", "")
        translator = Translator(mounts, ctx.pod_ip)
        env = _env(ctx, container)
        command = container.get("command") or image_command(container)
        if not command:
            raise PodError("CreateContainerError", f"container {container['name']!r}: image "
                           f"{container.get('image')!r} has no command and no test double")
        argv = [translator.arg(_expand(a, env)) for a in
                [*command, *[str(a) for a in container.get("args") or []]]]
        process_env = {**base_env, **{k: translator.text(v) for k, v in env.items()},
                       "POD_RUNNER_MOUNTS": json.dumps({k: str(v) for k, v in mounts.items()})}
        workdir = container.get("workingDir")
        cwd = Path(translator.path(workdir)) if workdir else ctx.pod_dir
        ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports") or []
                 if p.get("name")}
        plans.append(ContainerPlan(
            name=container["name"], argv=argv, env=process_env, cwd=cwd, mounts=mounts,
            ports=ports, readiness=container.get("readinessProbe"),
            liveness=container.get("livenessProbe"), startup=container.get("startupProbe"),
            spec=container))
    return plans

