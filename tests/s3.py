"""A local S3 for tests: moto's server on a free port of 127.0.0.1, reached over HTTP by boto3 and by
pyarrow's S3FileSystem alike, from this process or from others (Ray workers, `farm` subprocesses)."""

import contextlib
import functools
import logging
import threading
import uuid
from unittest import mock


@contextlib.contextmanager
def moto_server():
    """Start the server with a new empty bucket; yield (a storage root in it, `s3://<bucket>/store`, env).

    `env` is what any process reaching the store needs (put it in os.environ, a subprocess's env or a Ray
    runtime_env): the endpoint and dummy credentials, read by boto3 and pyarrow both. The URI carries no
    `?endpoint_override=`: the farm joins paths onto the storage root (Ray Tune's storage_path), which a
    query string would break. Each use gets a fresh prefix, so tests sharing a bucket never meet."""
    import boto3
    from conftest import free_port
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    bucket, port = f"farm-{uuid.uuid4().hex[:12]}", free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no credential or region lookups on a cloud's metadata address
    }
    # moto checks a write's precondition (If-None-Match, If-Match) and then writes, unlocked, while its
    # server answers requests on several threads: two racing conditional writes could both pass. S3 does
    # check and write atomically; one lock over moto's writes and deletes makes this server do the same,
    # so the tests exercise the farm's lease, not moto's race.
    atomic = threading.Lock()

    def serialised(handler):
        @functools.wraps(handler)
        def run(self, *args, **kwargs):
            with atomic:
                return handler(self, *args, **kwargs)

        return run

    with (
        mock.patch.object(S3Response, "put_object", serialised(S3Response.put_object)),
        mock.patch.object(S3Response, "delete_object", serialised(S3Response.delete_object)),
    ):
        server.start()
        try:
            boto3.client(
                "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
            ).create_bucket(Bucket=bucket)
            yield f"s3://{bucket}/store", env
        finally:
            server.stop()
