"""Can the bucket be reached with the WriteCache's credentials? (boto3, run off the loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from cistern.writecache import ObjectStoreSpec

__all__ = ["BucketProblem", "probe_bucket"]


class BucketProblem(Exception):
    """The bucket is unreachable, missing or forbidden; ``reason`` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _probe(store: ObjectStoreSpec, credentials: Mapping[str, str], timeout: float) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions

    config = botocore.config.Config(
        connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1},
        s3={"addressing_style": "path" if store.path_style else "auto"})
    client = boto3.session.Session().client(
        "s3", endpoint_url=store.endpoint, region_name=store.region or "us-east-1",
        aws_access_key_id=credentials.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=credentials.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=credentials.get("AWS_SESSION_TOKEN"), config=config)
    try:
        client.head_bucket(Bucket=store.bucket)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise BucketProblem("BucketNotFound",
                                f"bucket {store.bucket!r} does not exist") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise BucketProblem("BucketAccessDenied",
                                f"access to bucket {store.bucket!r} denied") from None
        raise BucketProblem("BucketUnreachable",
                            f"bucket {store.bucket!r}: S3 error {code}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise BucketProblem("BucketUnreachable",
                            f"bucket {store.bucket!r}: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()


async def probe_bucket(store: ObjectStoreSpec, credentials: Mapping[str, str],
                       timeout: float = 5.0) -> None:
    """Raise ``BucketProblem`` unless HEAD bucket succeeds. Credentials are never logged."""
    await asyncio.to_thread(_probe, store, credentials, timeout)
