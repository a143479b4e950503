"""An S3 latency/fault-injecting reverse proxy for tests and benchmarks.

The proxy listens on 127.0.0.1 in front of an S3 endpoint (normally ``MotoServer``) and

* delays every S3 request by a fixed latency before forwarding it, and can hold the answer
  of a forwarded request (``response_delay``: the request took effect, its client has not
  heard yet),
* answers a configurable fraction of requests (optionally only some kinds) with a real
  S3 error document (``503 SlowDown`` or ``500 InternalError``) without forwarding them,
* can flip a byte of the next GET answers (``corrupt_gets``),
* can simulate an outage: every request fails with ``503 ServiceUnavailable`` or the
  connection is reset,
* counts requests by kind (``PUT``, ``PART``, ``CREATE_MPU``, ``COMPLETE_MPU``,
  ``ABORT_MPU``, ``COPY``, ``DELETE``, ``GET``, ``HEAD``, ``LIST``, ``OTHER``) and keeps
  an ordered log of completed requests.

Use it in-process::

    with FaultProxy(moto.endpoint, latency=0.035, error_rate=0.3) as proxy:
        client = s3_client(proxy.endpoint)
        ...
        proxy.counts()["PUT"]

or as a process (``python -m support.faultproxy --upstream URL --port N``), whose
control endpoints ``GET /__proxy/stats``, ``GET /__proxy/log``, ``POST /__proxy/config``
and ``POST /__proxy/reset`` are wrapped by ``ProxyControl``; ``FaultProxyProcess`` starts
such a process. Control endpoints are never delayed, failed or counted (``__proxy`` is not
a valid bucket name, so they cannot shadow S3 requests).

Log entries are appended when the response to the client is complete, so the order of
``PUT`` entries with status 200 is the order in which objects became durable upstream.

The modules of this package, from the bottom up: ``kinds`` (what kind of S3 request a
request is), ``config`` (the settings), ``state`` (the fault decisions, counters and log
shared by the connection threads), ``relay`` (the HTTP relay: forwarding, body streaming,
injected failures), ``control`` (the control endpoints and their client), ``proxy`` (the
proxy in this process or as a child process) and ``__main__`` (the command line).
"""

from __future__ import annotations

from .config import OUTAGE_MODES, ProxyConfig
from .control import CONTROL_PREFIX, ProxyControl
from .kinds import KINDS, classify
from .proxy import FaultProxy, FaultProxyProcess
from .state import LogEntry

__all__ = [
    "CONTROL_PREFIX",
    "KINDS",
    "OUTAGE_MODES",
    "FaultProxy",
    "FaultProxyProcess",
    "LogEntry",
    "ProxyConfig",
    "ProxyControl",
    "classify",
]
