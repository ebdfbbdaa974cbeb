"""Shards in object stores (``s3://``, ``gs://``): ranged reads that ride out faults, and prefetch.

Flow: a shard URL ``s3://bucket/key`` -> :class:`ObjectReader`, a raw file over
``GET Range: bytes=OFFSET-`` (boto3: its credential chain reads the environment, including
``AWS_ENDPOINT_URL``, and the AWS config files) -> a transient error (connection reset or cut
inside the body, timeout, HTTP 5xx, SlowDown) closes the body and GETs again from the byte it
stopped at, after an exponential backoff, so the bytes handed out are exactly those of a
fault-free read; a permanent error (403, 404, ...) raises ``ShardOpenError`` naming the URL.
:class:`Prefetcher` runs those reads in a background thread for the current shard and the next
ones of a stream, holding at most ``data.prefetch_bytes``, so the first-byte latency of the
next shard is paid while the current one is decoded.

``gs://bucket/key`` reads Google Cloud Storage through its S3-compatible XML API
(https://storage.googleapis.com) with HMAC keys given as AWS credentials.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from llip_scale.errors import ConfigError

log = logging.getLogger("llip_scale.data")
SCHEMES = ("s3://", "gs://")
GCS_ENDPOINT = "https://storage.googleapis.com"
CHUNK = 1 << 20  # bytes per body read
MAX_BACKOFF = 30.0  # seconds: the longest wait between two attempts
# HTTP statuses and S3 error codes a later attempt may not see again.
TRANSIENT_STATUS = (500, 502, 503, 504)
TRANSIENT_CODES = ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling")


class ShardOpenError(Exception):
    """A shard could not be opened or its command failed; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def is_object_url(url: str) -> bool:
    return url.startswith(SCHEMES)


def split_url(url: str) -> tuple[str, str, str]:
    """``"s3://bucket/a/b.tar"`` -> ``("s3", "bucket", "a/b.tar")``."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    return scheme, bucket, key


def require_boto3(what: str) -> None:
    """A one-line ``ConfigError`` when boto3, which reads object-store shards, is missing."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} names s3:// or gs:// shards, which need boto3: "
                          f"pip install llip_scale[s3]") from None


@dataclass(frozen=True)
class ObjectOptions:
    """How object-store shards are read; picklable (sent to the DataLoader workers)."""

    retries: int = 8  # attempts after the first, per fault, before the shard fails
    backoff: float = 0.5  # seconds before the first retry, doubled on each further one
    timeout: float = 60.0  # connect and read timeout of one request, seconds
    prefetch_bytes: int = 64 << 20  # read ahead per stream; 0: no background reads


@dataclass
class RetryCounts:
    """Retries by kind (``cut``, ``timeout``, ``connection``, ``http_503``, ...), thread-safe."""

    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(sorted(self.counts.items()))


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def client(scheme: str, timeout: float) -> Any:
    """One boto3 S3 client per process, scheme and timeout (clients are thread-safe, not
    fork-safe: a DataLoader worker makes its own). botocore's own retries are off: every retry
    happens here, where it continues at the right byte and is counted."""
    key = (os.getpid(), scheme, timeout)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = _make_client(scheme, timeout)
        return _clients[key]


def _make_client(scheme: str, timeout: float) -> Any:
    import boto3  # optional (llip_scale[s3]): imported only when an object store is read
    from botocore.config import Config  # optional, as boto3

    settings: dict[str, Any] = dict(retries={"total_max_attempts": 1}, connect_timeout=timeout,
                                    read_timeout=timeout, max_pool_connections=16)
    kwargs: dict[str, Any] = {}
    if scheme == "gs":  # GCS's XML API: path-style requests, HMAC keys signed for region "auto"
        settings["s3"] = {"addressing_style": "path"}
        kwargs = {"endpoint_url": GCS_ENDPOINT, "region_name": "auto"}
    try:  # checksum headers newer botocore adds by default, which GCS does not accept
        config = Config(**settings, request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
    except TypeError:  # botocore before 1.36 sends none
        config = Config(**settings)
    return boto3.session.Session().client("s3", config=config, **kwargs)


def transient_kind(error: BaseException) -> str | None:
    """The kind of a fault worth another attempt, None for a permanent one."""
    from botocore import exceptions as bx  # optional (llip_scale[s3]), as boto3

    if isinstance(error, bx.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "SlowDown":
            return "slow_down"
        if status in TRANSIENT_STATUS or code in TRANSIENT_CODES:
            return f"http_{status}"
        return None
    if isinstance(error, (bx.ReadTimeoutError, bx.ConnectTimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(error, (bx.IncompleteReadError, bx.ResponseStreamingError)):
        return "cut"
    if isinstance(error, (bx.EndpointConnectionError, bx.ConnectionClosedError, ConnectionError)):
        return "connection"
    if type(error).__module__.startswith("urllib3"):  # raised by the body's raw stream
        from urllib3 import exceptions as ux  # comes with botocore, which is optional

        if isinstance(error, ux.TimeoutError):
            return "timeout"
        return "cut" if isinstance(error, ux.ProtocolError) else "connection"
    return None


def describe(url: str, error: BaseException) -> str:
    """``"s3://b/k: 404 NoSuchKey (The specified key does not exist.)"``."""
    from botocore import exceptions as bx  # optional (llip_scale[s3]), as boto3

    if isinstance(error, bx.ClientError):
        err = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        code = err.get("Code", "")
        message = f" ({err['Message']})" if err.get("Message") else ""
        named = f" {code}" if code and code != str(status) else ""  # HEAD answers carry no code
        return f"{url}: {status}{named}{message}"
    if isinstance(error, bx.NoCredentialsError):
        return f"{url}: no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    return f"{url}: {type(error).__name__}: {error}"


class ObjectReader(io.RawIOBase):
    """The bytes of one object from ``offset`` on, through any number of transient faults."""

    def __init__(self, url: str, offset: int, options: ObjectOptions, retries: RetryCounts):
        super().__init__()
        self.url, self.pos, self.options, self.retries = url, offset, options, retries
        self.scheme, self.bucket, self.key = split_url(url)
        self._body: Any = None
        self._etag: str | None = None  # later GETs must see the same object, not a new upload
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        faults = 0
        while not self._ended:
            try:
                data = self._read(len(buffer))
            except Exception as e:  # noqa: BLE001 - sorted into transient and permanent below
                self._drop_body()
                kind = transient_kind(e)
                if kind is None:
                    raise ShardOpenError("unreadable_shard", describe(self.url, e)) from None
                faults += 1
                if faults > self.options.retries:
                    raise ShardOpenError("unreadable_shard", f"{describe(self.url, e)}; gave up at byte "
                                         f"{self.pos} after {self.options.retries} retries "
                                         f"(data.s3_retries)") from None
                self.retries.add(kind)
                wait = min(self.options.backoff * 2 ** (faults - 1), MAX_BACKOFF)
                log.info("data: %s at byte %d of %s, retry %d in %.2fs", kind, self.pos, self.url,
                         faults, wait)
                time.sleep(wait)
                continue
            if data:
                buffer[:len(data)] = data
                self.pos += len(data)
                return len(data)
            self._ended = True
        return 0

    def _read(self, n: int) -> bytes:
        if self._body is None:
            self._get()
            if self._body is None:  # the offset is the end of the object
                return b""
        # What the connection has (at most one socket read), so a fault loses no byte already
        # received: the next attempt starts right after the last byte handed out.
        raw = getattr(self._body, "_raw_stream", None)
        data = raw.read1(n) if hasattr(raw, "read1") else self._body.read(n)
        if not data:
            self._drop_body()
        return data

    def _get(self) -> None:
        from botocore.exceptions import ClientError  # optional (llip_scale[s3]), as boto3

        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            args["Range"] = f"bytes={self.pos}-"
        if self._etag:
            args["IfMatch"] = self._etag
        try:
            response = client(self.scheme, self.options.timeout).get_object(**args)
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416:
                return  # a range starting at the object's size: nothing left to read
            raise
        self._etag = self._etag or response.get("ETag")
        self._body = response["Body"]

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped
                pass

    def close(self) -> None:
        self._drop_body()
        super().close()


def head(url: str, options: ObjectOptions) -> None:
    """Raise ``ShardOpenError`` when the object is missing or forbidden; transient faults pass."""
    scheme, bucket, key = split_url(url)
    try:
        client(scheme, options.timeout).head_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001 - sorted below
        if transient_kind(e) is None:
            raise ShardOpenError("unreadable_shard", describe(url, e)) from None


@dataclass
class _Job:
    """One shard read ahead: its chunks, then None (the end) or the error that ended it."""

    index: int  # the shard's position in the stream's shard order
    url: str
    offset: int
    chunks: deque = field(default_factory=deque)
    started: bool = False  # the background thread took it
    cancelled: bool = False  # the consumer will not read it (any more)


class Prefetcher:
    """Background reads of one stream's object-store shards, in the stream's shard order."""

    def __init__(self, options: ObjectOptions, retries: RetryCounts):
        self.options, self.retries = options, retries
        self.limit = max(options.prefetch_bytes, 1)
        self.cond = threading.Condition()
        self.jobs: deque[_Job] = deque()  # to be read by the consumer, in order
        self.held = 0  # bytes read and not consumed yet
        self.stopped = False
        self.thread: threading.Thread | None = None

    def open(self, index: int, url: str, offset: int, upcoming: Iterable[tuple[int, str]]) -> io.BufferedReader:
        """The shard at stream position ``index`` from byte ``offset``; ``upcoming`` are the
        (position, URL) of the object-store shards the stream reads after it."""
        with self.cond:
            while self.jobs and self.jobs[0].index < index:  # shards the stream passed over
                self._cancel(self.jobs.popleft())
            if self.jobs and (self.jobs[0].url, self.jobs[0].offset) != (url, offset):
                while self.jobs:
                    self._cancel(self.jobs.popleft())
            if not self.jobs:
                self.jobs.append(_Job(index, url, offset))
            planned = {job.index for job in self.jobs}
            self.jobs.extend(_Job(i, u, 0) for i, u in upcoming if i > index and i not in planned)
            job = self.jobs[0]
            self.cond.notify_all()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="llip-prefetch", daemon=True)
            self.thread.start()
        return io.BufferedReader(_JobBody(self, job), buffer_size=CHUNK)

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            while self.jobs:
                self._cancel(self.jobs.popleft())
            self.cond.notify_all()

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        self.held -= sum(len(c) for c in job.chunks if isinstance(c, memoryview))
        job.chunks.clear()
        self.cond.notify_all()

    def _next_job(self) -> _Job | None:
        with self.cond:
            while not self.stopped:
                job = next((j for j in self.jobs if not j.started and not j.cancelled), None)
                if job is not None:
                    job.started = True
                    return job
                self.cond.wait()
        return None

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            reader = ObjectReader(job.url, job.offset, self.options, self.retries)
            try:
                while not job.cancelled:
                    with self.cond:  # wait for room (bytes held below the limit)
                        while self.held >= self.limit and not job.cancelled and not self.stopped:
                            self.cond.wait()
                    if job.cancelled or self.stopped:
                        break
                    data = reader.read(min(CHUNK, self.limit))
                    self._put(job, memoryview(data) if data else None)
                    if not data:
                        break
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, at its place
                self._put(job, e)
            finally:
                reader.close()

    def _put(self, job: _Job, item: memoryview | BaseException | None) -> None:
        with self.cond:
            if not job.cancelled:
                job.chunks.append(item)
                if isinstance(item, memoryview):
                    self.held += len(item)
            self.cond.notify_all()

    def take(self, job: _Job, n: int) -> bytes:
        """Up to ``n`` bytes of ``job``; b"" at its end; raises the error that ended it."""
        with self.cond:
            while not job.chunks:
                if job.cancelled:
                    raise ShardOpenError("unreadable_shard", f"{job.url}: read cancelled")
                self.cond.wait()
            item = job.chunks[0]
            if item is None:
                return b""
            if isinstance(item, BaseException):
                raise item
            piece, rest = item[:n], item[n:]
            if rest:
                job.chunks[0] = rest
            else:
                job.chunks.popleft()
            self.held -= len(piece)
            self.cond.notify_all()
            return bytes(piece)

    def finish(self, job: _Job) -> None:
        """The consumer is done with ``job`` (read to its end or closed early)."""
        with self.cond:
            if self.jobs and self.jobs[0] is job:
                self.jobs.popleft()
            self._cancel(job)  # frees what is left of it; the thread moves on


class _JobBody(io.RawIOBase):
    def __init__(self, prefetcher: Prefetcher, job: _Job):
        super().__init__()
        self.prefetcher, self.job = prefetcher, job

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.prefetcher.take(self.job, len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.prefetcher.finish(self.job)
        super().close()


def direct(url: str, offset: int, options: ObjectOptions, retries: RetryCounts) -> io.BufferedReader:
    """A shard read in the caller's thread (``data.prefetch_bytes: 0``)."""
    return io.BufferedReader(ObjectReader(url, offset, options, retries), buffer_size=CHUNK)

