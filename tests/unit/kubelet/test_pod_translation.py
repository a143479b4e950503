"""The pod runner's translation of a container's view (paths, wildcard binds, $(VAR))."""

from __future__ import annotations

from pathlib import Path

from support.kubelet.pods import Translator, _expand

MOUNTS = {"/csi": Path("/r/plugins/csi.cistern.dev"), "/etc/cistern": Path("/r/pod/config"),
          "/etc/cistern-control": Path("/r/pod/token"),
          "/var/lib/cistern/mounts": Path("/r/host/var/lib/cistern/mounts")}


def test_paths_are_translated_as_whole_components() -> None:
    t = Translator(MOUNTS, "127.9.9.9")
    assert t.arg("--endpoint=unix:///csi/csi.sock") == \
        "--endpoint=unix:///r/plugins/csi.cistern.dev/csi.sock"
    assert t.text("controlTokenFile: /etc/cistern-control/token\nmount: "
                  "/var/lib/cistern/mounts/ckpt\n") == \
        "controlTokenFile: /r/pod/token/token\nmount: /r/host/var/lib/cistern/mounts/ckpt\n"
    assert t.path("/etc/cistern/node.yaml") == "/r/pod/config/node.yaml"
    # Not a mounted path: a longer name, or the path inside another one.
    assert t.text("/etc/cisternx /opt/csi /csiv") == "/etc/cisternx /opt/csi /csiv"


def test_wildcard_binds_become_the_pod_ip() -> None:
    t = Translator({}, "127.9.9.9")
    assert t.arg("--health-address=:9808") == "--health-address=127.9.9.9:9808"
    assert t.arg("--liveness=http://0.0.0.0:8080/healthz") == \
        "--liveness=http://127.9.9.9:8080/healthz"
    assert t.text("control: 0.0.0.0:9464") == "control: 127.9.9.9:9464"
    assert t.text("10.0.0.0:1 0.0.0.01") == "10.0.0.0:1 0.0.0.01"


def test_kubelet_variable_expansion() -> None:
    env = {"NODE_NAME": "node-1"}
    assert _expand("--node-id=$(NODE_NAME)", env) == "--node-id=node-1"
    assert _expand("$$(NODE_NAME) $(MISSING)", env) == "$(NODE_NAME) $(MISSING)"
