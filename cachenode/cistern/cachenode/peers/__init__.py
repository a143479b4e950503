"""Peer copies and peer reads between the cache nodes of one WriteCache (issue 17).

``protocol`` (frames), ``auth`` (HMAC challenge-response), ``copies`` (copies held for other
nodes, durable before the ack), ``server`` / ``client`` (TCP), ``membership`` (the member
list the operator keeps current), ``index`` (who holds which dirty file), ``replicator`` (the
core's replication hook), ``overlay`` (peer-held files seen through the object-store
interface), ``rescue`` (uploading the copies of a node that died), ``transport`` (TCP, RDMA
detection), ``node`` (wiring, status, metrics). See docs/dev/peers.md.
"""
