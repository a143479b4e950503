"""S3 errors: one exception type carrying S3's code and HTTP status, rendered as S3's XML.

Handlers raise ``S3Error``; the server's one error boundary (``server._errors``) turns it, and
``OSError`` from the cache core, into an XML error response.
"""

from __future__ import annotations

import errno
from xml.sax.saxutils import escape

__all__ = ["S3Error", "error_xml", "from_oserror"]

_STATUS = {
    "AccessDenied": 403,
    "BadDigest": 400,
    "EntityTooLarge": 400,
    "EntityTooSmall": 400,
    "IncompleteBody": 400,
    "InternalError": 500,
    "InvalidArgument": 400,
    "InvalidBucketName": 400,
    "InvalidDigest": 400,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "InvalidRange": 416,
    "InvalidRequest": 400,
    "KeyTooLongError": 400,
    "MalformedXML": 400,
    "MethodNotAllowed": 405,
    "MissingContentLength": 411,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "NotImplemented": 501,
    "PreconditionFailed": 412,
    "RequestTimeTooSkewed": 403,
    "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403,
    "SlowDown": 503,
    "XAmzContentSHA256Mismatch": 400,
    "InvalidAccessKeyId": 403,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "TooManyUploads": 503,
}


class S3Error(Exception):
    """An S3 error response: ``code`` is S3's error code, ``status`` its HTTP status."""

    def __init__(self, code: str, message: str, *, resource: str = "",
                 status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.resource = resource
        self.status = status or _STATUS.get(code, 400)


def error_xml(err: S3Error, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
        f"<Code>{escape(err.code)}</Code><Message>{escape(err.message)}</Message>"
        f"<Resource>{escape(err.resource)}</Resource><RequestId>{request_id}</RequestId>"
        "</Error>"
    ).encode()


def from_oserror(exc: OSError, resource: str) -> S3Error:
    """The cache core speaks errno (like a file system); map it to S3's words."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return S3Error("NoSuchKey", "The specified key does not exist.", resource=resource)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return S3Error("SlowDown", "The cache is full; retry later.", resource=resource)
    if code == errno.EROFS:
        return S3Error("ServiceUnavailable", "The cache node is draining; retry on another "
                       "node or later.", resource=resource)
    if code in (errno.ENAMETOOLONG,):
        return S3Error("KeyTooLongError", "Your key is too long.", resource=resource)
    if code in (errno.EINVAL, errno.EEXIST, errno.ENOTEMPTY):
        return S3Error("InvalidArgument", f"The key conflicts with the namespace: "
                       f"{exc.strerror}", resource=resource)
    return S3Error("InternalError", "We encountered an internal error. Please try again.",
                   resource=resource)
