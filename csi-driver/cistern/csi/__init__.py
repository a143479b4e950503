"""The Cistern CSI driver (``csi.cistern.dev``): CSI v1 Identity, Node and Controller services.

Pods get a directory of a WriteCache's FUSE mount as a volume: a PVC through the WriteCache's
StorageClass, a static PV (``volumeHandle: <writecache>/<dir>``) or an inline CSI volume
(``volumeAttributes: {writeCache, path}``). See docs/csi.md.
"""
