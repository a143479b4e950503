"""Generated CSI v1 bindings (see ``cistern.csi.protogen``); do not edit by hand."""
