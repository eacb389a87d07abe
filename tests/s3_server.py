"""A real S3 endpoint on 127.0.0.1 for the tests: moto's threaded server, reached through s3fs as a user would.

The server counts the HTTP requests it answers (method and key), so a test can say how many GETs a lazy query
made.  Nothing here talks to any other address.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid

#: credentials the tests use: any value works with moto; these are looked for in attributes, logs and errors
ACCESS_KEY = "AKIASKETCHARRAYTEST01"
SECRET_KEY = "s3cr3t-sketcharray-never-shown-0123456789"

_REQUEST = re.compile(r'"(GET|PUT|HEAD|DELETE|POST) (\S+) HTTP/')


class _Counter(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.requests: list[tuple[str, str]] = []
        self.guard = threading.Lock()

    def emit(self, record):
        found = _REQUEST.search(record.getMessage())
        if found:
            with self.guard:
                self.requests.append((found.group(1), found.group(2)))


class S3Server:
    """moto's S3 server on 127.0.0.1 (a free port), one bucket, and a count of the requests it served."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.counter = _Counter()
        served = logging.getLogger("werkzeug")  # the server's request log: counted, not printed
        served.addHandler(self.counter)
        served.setLevel(logging.INFO)
        served.propagate = False
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.bucket = "sketcharray-test"
        self.options = {"key": ACCESS_KEY, "secret": SECRET_KEY,
                        "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}
        import s3fs

        fs = s3fs.S3FileSystem(**self.options)
        fs.call_s3("create_bucket", Bucket=self.bucket)

    def env(self) -> dict:
        """The environment variables that give a subprocess (the command line) this server and its credentials."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, name: str = "run.zarr") -> str:
        """A fresh URL under a prefix of its own."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}/{name}"

    def mark(self) -> int:
        with self.counter.guard:
            return len(self.counter.requests)

    def since(self, mark: int, method: str | None = None, contains: str = "") -> list[str]:
        with self.counter.guard:
            return [key for m, key in self.counter.requests[mark:] if (method is None or m == method)
                    and contains in key]

    def stop(self):
        self._server.stop()
