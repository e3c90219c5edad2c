"""A local S3-compatible server (moto's standalone server) on 127.0.0.1, with the process environment pointed at
it as a user's would be (the standard AWS variables), for the scale benchmark and the tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time


@contextlib.contextmanager
def local_s3_server(access_key: str = "testing-key", secret_key: str = "testing-secret", log=None):
    """Start the server, set AWS_* for this process (and its children), yield the endpoint URL; afterwards the
    server is stopped and the environment restored. ``log``: a file that receives the server's request log (one
    line per request), for counting requests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed when the server stops)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=sink, stderr=sink)
    env = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local S3 server did not start") from None
                time.sleep(0.1)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # no filesystem made for another endpoint is reused
        yield env["AWS_ENDPOINT_URL"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if log is not None:
            sink.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with contextlib.suppress(ImportError):
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
