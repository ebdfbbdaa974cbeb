"""A small HTTP proxy for the object-store tests: faults on demand, bytes served counted.

It sits between the S3 client and a local S3 server (one request per connection, answered with
``Connection: close``). For each object path it can answer the first requests with an HTTP
error (``"503"``, ``"slowdown"`` (503 SlowDown), ``"500"``, ``"403"``), cut the connection after some bytes of the body (``"cut:N"``) or
stall before the first byte (``"stall:SECONDS"``); ``latency`` delays the first byte of every
response. ``served`` counts the body bytes sent per path, ``requests`` logs [method, path, Range,
body bytes sent] per request.
"""
from __future__ import annotations

import collections
import http.client
import socket
import threading
import time
from urllib.parse import urlsplit

ERROR_BODY = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
              "<Message>{message}</Message></Error>")
ERRORS = {"503": ("Service Unavailable", "ServiceUnavailable", "Service is unable to handle request."),
          "slowdown": ("Slow Down", "SlowDown", "Please reduce your request rate."),
          "500": ("Internal Server Error", "InternalError", "We encountered an internal error."),
          "403": ("Forbidden", "AccessDenied", "Access Denied")}


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.latency = 0.0
        self.faults: dict[str, list[str]] = collections.defaultdict(list)  # path suffix -> planned
        self.forbidden: set[str] = set()  # path suffixes always answered 403
        self.served: collections.Counter = collections.Counter()
        self.requests: list[list] = []
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.latency = 0.0
            self.faults.clear()
            self.forbidden.clear()
            self.served.clear()
            self.requests.clear()

    def plan(self, suffix: str, *faults: str) -> None:
        """Faults for the next requests of the objects whose path ends with ``suffix``."""
        with self.lock:
            self.faults[suffix].extend(faults)

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    # -- serving -----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _fault_for(self, path: str) -> str | None:
        with self.lock:
            if any(path.endswith(s) for s in self.forbidden):
                return "403"
            for suffix, planned in self.faults.items():
                if path.endswith(suffix) and planned:
                    return planned.pop(0)
        return None

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                method, target, headers, body = _read_request(conn)
            except (OSError, ValueError):
                return
            path = target.split("?", 1)[0]
            record = [method, path, headers.get("range"), 0]
            with self.lock:
                self.requests.append(record)
            fault = self._fault_for(path) if method in ("GET", "HEAD") else None
            if self.latency:
                time.sleep(self.latency)
            if fault and fault.startswith("stall:"):
                time.sleep(float(fault.split(":", 1)[1]))
                fault = None
            if fault in ERRORS:
                reason, code, message = ERRORS[fault]
                payload = ERROR_BODY.format(code=code, message=message).encode() if method == "GET" else b""
                status = 503 if fault == "slowdown" else fault
                _send(conn, f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                      f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
                return
            cut = int(fault.split(":", 1)[1]) if fault and fault.startswith("cut:") else None
            self._relay(conn, method, target, headers, body, record, cut)

    def _relay(self, conn, method, target, headers, body, record, cut) -> None:
        upstream = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            upstream.request(method, target, body=body, headers=headers)
            response = upstream.getresponse()
            head = [f"HTTP/1.1 {response.status} {response.reason}"]
            head += [f"{k}: {v}" for k, v in response.getheaders()
                     if k.lower() not in ("connection", "keep-alive", "transfer-encoding")]
            data = response.read()
            if not any(k.lower() == "content-length" for k, _ in response.getheaders()):
                head.append(f"Content-Length: {len(data)}")
            head.append("Connection: close")
            sent = data if cut is None else data[:cut]
            if not _send(conn, ("\r\n".join(head) + "\r\n\r\n").encode() + sent):
                return
            if method == "GET":
                with self.lock:
                    self.served[record[1]] += len(sent)
                    record[3] = len(sent)
            if cut is not None:  # a connection reset in the middle of the body
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        finally:
            upstream.close()


def _read_request(conn: socket.socket) -> tuple[str, str, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("connection closed before a request")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return method, target, headers, rest


def _send(conn: socket.socket, data: bytes) -> bool:
    try:
        conn.sendall(data)
        return True
    except OSError:
        return False
