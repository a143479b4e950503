"""AWS Signature Version 4 verification (header and presigned-query forms).

The expected signature is computed by botocore's own signer (``S3SigV4Auth``: canonical
headers, query, string to sign, key derivation) from the request exactly as it came in, and
compared in constant time. Streaming uploads (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``) carry one
signature per chunk, chained from the seed signature; ``ChunkSigner`` checks those.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

from cistern.cachenode.s3api.errors import S3Error

__all__ = ["AuthResult", "ChunkSigner", "Credential", "Verifier", "load_credential"]

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_MODES = (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER)
MAX_SKEW = dt.timedelta(minutes=15)
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Credential:
    access_key: str
    secret_key: str

    def __repr__(self) -> str:  # never print the secret
        return f"Credential(access_key={self.access_key!r}, secret_key=***)"


def load_credential(directory: str | Path) -> Credential:
    """Read ``accessKeyId`` and ``secretAccessKey`` from a directory (a mounted Secret)."""
    base = Path(directory)
    access = (base / "accessKeyId").read_text().strip()
    secret = (base / "secretAccessKey").read_text().strip()
    if not access or not secret:
        raise ValueError(f"{base}: accessKeyId and secretAccessKey must not be empty")
    return Credential(access, secret)


@dataclass(frozen=True)
class AuthResult:
    """What a verified request says about its payload."""

    payload: str
    """The x-amz-content-sha256 value: a hex digest, ``UNSIGNED-PAYLOAD`` or a streaming mode."""
    signer: ChunkSigner | None
    """For signed streaming payloads: checks the chunk signatures."""


class ChunkSigner:
    """Chained chunk signatures of a ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` body."""

    def __init__(self, auth: S3SigV4Auth, request: AWSRequest, scope: str, seed: str) -> None:
        self._auth = auth
        self._request = request
        self._timestamp = request.context["timestamp"]
        self._scope = scope
        self.previous = seed

    def check_chunk(self, data: bytes, signature: str) -> None:
        sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", self._timestamp, self._scope,
                         self.previous, EMPTY_SHA256, hashlib.sha256(data).hexdigest()])
        self._check(sts, signature)

    def check_trailer(self, canonical_trailer: bytes, signature: str) -> None:
        sts = "\n".join(["AWS4-HMAC-SHA256-TRAILER", self._timestamp, self._scope,
                         self.previous, hashlib.sha256(canonical_trailer).hexdigest()])
        self._check(sts, signature)

    def _check(self, sts: str, signature: str) -> None:
        expected = self._auth.signature(sts, self._request)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise S3Error("SignatureDoesNotMatch", "A chunk signature of the streaming "
                          "payload does not match.")
        self.previous = expected


def _parse_auth_header(value: str) -> dict[str, str]:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise S3Error("AccessDenied", "Only AWS Signature Version 4 (AWS4-HMAC-SHA256) is "
                      "accepted.")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, sep, val = item.strip().partition("=")
        if sep:
            fields[name] = val
    if not {"Credential", "SignedHeaders", "Signature"} <= set(fields):
        raise S3Error("AuthorizationHeaderMalformed", "The authorization header is malformed.")
    return fields


def _parse_time(value: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise S3Error("AccessDenied", "X-Amz-Date is missing or malformed.") from None


class Verifier:
    """Checks that a request is signed with the endpoint's one credential."""

    def __init__(self, credential: Credential) -> None:
        self._credential = credential
        self._botocore = Credentials(credential.access_key, credential.secret_key)

    def verify(self, method: str, raw_path: str, query: Iterable[tuple[str, str]],
               headers: dict[str, list[str]], now: dt.datetime) -> AuthResult:
        """``raw_path`` as sent (URI-encoded), ``query`` decoded pairs, ``headers`` by lower-case
        name. Raise ``S3Error`` unless the signature is the credential's."""
        params = list(query)
        names = {k for k, _ in params}
        auth_header = headers.get("authorization", [""])[0]
        if auth_header:
            fields = _parse_auth_header(auth_header)
            credential, signed, signature = (fields["Credential"], fields["SignedHeaders"],
                                             fields["Signature"])
            stamp = (headers.get("x-amz-date") or [""])[0]
            when = _parse_time(stamp)
            if abs(now - when) > MAX_SKEW:
                raise S3Error("RequestTimeTooSkewed", "The difference between the request "
                              "time and the server's time is too large.")
            payload = (headers.get("x-amz-content-sha256") or [""])[0]
            if not payload:
                raise S3Error("InvalidRequest", "Missing required header for this request: "
                              "x-amz-content-sha256.")
        elif "X-Amz-Signature" in names:
            q = dict(params)
            if q.get("X-Amz-Algorithm") != ALGORITHM:
                raise S3Error("AuthorizationQueryParametersError",
                              "X-Amz-Algorithm must be AWS4-HMAC-SHA256.")
            credential, signed, signature = (q.get("X-Amz-Credential", ""),
                                             q.get("X-Amz-SignedHeaders", ""),
                                             q["X-Amz-Signature"])
            stamp = q.get("X-Amz-Date", "")
            when = _parse_time(stamp)
            try:
                expires = int(q.get("X-Amz-Expires", ""))
            except ValueError:
                raise S3Error("AuthorizationQueryParametersError",
                              "X-Amz-Expires must be a number of seconds.") from None
            if not 0 < expires <= MAX_PRESIGN_EXPIRES:
                raise S3Error("AuthorizationQueryParametersError",
                              "X-Amz-Expires must be between 1 and 604800 seconds.")
            if now > when + dt.timedelta(seconds=expires) or when - now > MAX_SKEW:
                raise S3Error("AccessDenied", "Request has expired")
            params = [(k, v) for k, v in params if k != "X-Amz-Signature"]
            payload = (headers.get("x-amz-content-sha256") or [UNSIGNED])[0]
        else:
            raise S3Error("AccessDenied", "Access Denied: requests must be signed (AWS SigV4).")

        parts = credential.split("/")
        if len(parts) != 5 or parts[3] != "s3" or parts[4] != "aws4_request" \
                or parts[1] != stamp[:8]:
            raise S3Error("AuthorizationHeaderMalformed", "The credential scope is malformed.")
        if not hmac.compare_digest(parts[0].encode(), self._credential.access_key.encode()):
            raise S3Error("InvalidAccessKeyId", "The AWS access key Id you provided does not "
                          "exist in our records.")
        region = parts[2]
        signed_names = [n for n in signed.split(";") if n]
        if "host" not in signed_names:
            raise S3Error("AccessDenied", "The host header must be signed.")
        to_sign = HTTPHeaders()
        for name in signed_names:
            values = headers.get(name)
            if values is None:
                raise S3Error("SignatureDoesNotMatch", f"Signed header {name} is missing.")
            for value in values:
                to_sign[name] = value

        auth = S3SigV4Auth(self._botocore, "s3", region)
        request = AWSRequest(method=method, url="http://endpoint/")
        request.context["timestamp"] = stamp
        canonical_query = auth._canonical_query_string_params(params)
        tail = "\n".join([auth.canonical_headers(to_sign) + "\n",
                          auth.signed_headers(to_sign), payload])
        # The canonical URI is the path as the client encoded it; clients that send some
        # characters raw still sign the encoded form, so that is tried second.
        candidates = [raw_path]
        reencoded = quote(unquote(raw_path), safe="/~")
        if reencoded != raw_path:
            candidates.append(reencoded)
        for uri in candidates:
            canonical = "\n".join([method.upper(), uri, canonical_query, tail])
            expected = auth.signature(auth.string_to_sign(request, canonical), request)
            if hmac.compare_digest(expected.encode(), signature.encode()):
                break
        else:
            raise S3Error("SignatureDoesNotMatch", "The request signature we calculated does "
                          "not match the signature you provided. Check your key and signing "
                          "method.")
        signer = None
        if payload in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
            signer = ChunkSigner(auth, request, auth.credential_scope(request), signature)
        return AuthResult(payload=payload, signer=signer)
