"""A peer that is slow, not dead, costs a writer the same bound as a dead one."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from cistern.cachenode.core.replication import FileVersion
from cistern.cachenode.peers.client import PeerPool
from cistern.cachenode.peers.copies import CopyStore
from cistern.cachenode.peers.membership import Member, Membership
from cistern.cachenode.peers.protocol import Op
from cistern.cachenode.peers.replicator import PeerReplication, rendezvous
from cistern.cachenode.peers.server import PeerServer
from cistern.peerconfig import DurabilityPolicy
from support.peers import TOKEN, HeldFiles, SlowRelay
from support.wait import wait_until

BOUND = 1.0


def test_a_slow_peer_is_hedged_and_given_up_within_the_bound(tmp_path: Path) -> None:
    servers = {name: PeerServer("127.0.0.1", 0, name, TOKEN, CopyStore(tmp_path / name),
                                HeldFiles({})) for name in ("slow", "fast")}
    for srv in servers.values():
        srv.start()
    relay = SlowRelay(servers["slow"].port)
    members = [Member("slow", "127.0.0.1", relay.port),
               Member("fast", "127.0.0.1", servers["fast"].port)]
    listing = tmp_path / "members.json"
    listing.write_text(json.dumps({"members": [
        {"node": m.node, "host": m.host, "port": m.port} for m in members]}))
    pool = PeerPool("writer", TOKEN, suspect_for=60)
    replication = PeerReplication(DurabilityPolicy.from_dict(
        {"level": "peers", "peers": 1, "peerTimeout": BOUND}), pool,
        Membership(listing, "writer"))
    key = next(k for k in (f"ckpt/shard-{i}" for i in range(100))
               if rendezvous(k, members)[0].node == "slow")  # the slow one is asked first
    data = os.urandom(3 * 2**20)
    src = tmp_path / "shard"
    src.write_bytes(data)
    try:
        pool.call(members[0], Op.PING, {}, time.monotonic() + 5)  # a live, pooled connection
        relay.delay = 4 * BOUND  # from now on every answer of "slow" comes late
        done = threading.Event()

        def fsync() -> None:
            fd = os.open(src, os.O_RDONLY)
            replication.replicate(FileVersion(key=key, fd=fd, size=len(data), mtime_ns=1,
                                              mode=0o100644, etag=None))
            done.set()

        threading.Thread(target=fsync, daemon=True).start()
        # The fsync returns once "fast" holds the copy (hedged at half the bound); it does
        # not wait for "slow" to answer (4 bounds) — the deadline here is generous, the
        # assertion is that the copy went to the other peer and nothing is missing.
        wait_until(done.is_set, timeout=3 * BOUND + 2, what="the fsync to return")
        assert replication.stats.shortfalls_total == 0
        row = servers["fast"].copies.get("writer", key)
        assert row is not None and servers["fast"].copies.data_path(row).read_bytes() == data
        # "slow" answered nothing within the bound: it is skipped from now on, like a dead one.
        wait_until(lambda: pool.suspects() == ["slow"], timeout=3 * BOUND + 2,
                   what="the slow peer to be suspect")
    finally:
        relay.close()
        replication.close()
        pool.close()
        for srv in servers.values():
            srv.stop()
