"""An S3-compatible endpoint over the cache namespace (path-style, SigV4).

What is written through it follows the same write-back rules as a file written through the
FUSE mount, and is visible there (and the reverse). See docs/s3-endpoint.md.
"""

from cistern.cachenode.s3api.server import S3Endpoint
from cistern.cachenode.s3api.sigv4 import Credential, load_credential

__all__ = ["Credential", "S3Endpoint", "load_credential"]
