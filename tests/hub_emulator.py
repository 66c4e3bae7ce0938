"""A Hugging Face hub emulator: a real HTTP server that serves model repos from local folders.

It answers the calls the installed ``huggingface_hub`` makes for ``snapshot_download`` with
``HF_ENDPOINT`` pointed at it, the way huggingface.co answers them:

* ``GET /api/models/{repo}[/revision/{rev}]``: model info with ``sha`` and ``siblings`` (sizes
  and LFS data with ``?blobs=True``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing;
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag``
  (the git blob id, or the sha256 for LFS files with ``X-Linked-Etag`` / ``X-Linked-Size``),
  ``Content-Length`` and ``Range`` support;
* unknown repo: 404 with ``X-Error-Code: RepoNotFound`` (and ``RevisionNotFound`` /
  ``EntryNotFound`` for a known repo).

No Xet headers are sent, so clients download over plain HTTP. For tests it can throttle the
bytes it sends, drop a file's connection once after N bytes, hold a file's body after N bytes
until released, and counts what it served.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Served as git LFS files on the real hub (by the usual .gitattributes); the rest are plain git.
LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf", ".h5", ".msgpack"}
)
LFS_POINTER_SIZE = 134
CHUNK_BYTES = 16 * 1024
LAST_MODIFIED = "2026-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class RepoFile:
    """One file of a served repo, with the ids the hub reports for it."""

    path: str
    content: bytes
    git_oid: str
    sha256: str | None  # set for LFS files

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_oid


@dataclass(frozen=True)
class Repo:
    repo_id: str
    sha: str
    files: dict[str, RepoFile]

    @property
    def size(self) -> int:
        return sum(file.size for file in self.files.values())


@dataclass(frozen=True)
class ServedRequest:
    """What the emulator answered to one request."""

    method: str
    path: str
    status: int
    range: str | None
    body_bytes: int
    filename: str | None  # the repo file, for resolve requests


@dataclass
class _Fault:
    filename: str | None
    after_bytes: int


@dataclass
class _Hold(_Fault):
    released: threading.Event = field(default_factory=threading.Event)


def load_repo(repo_id: str, directory: Path) -> Repo:
    """Read a model folder into a repo whose commit sha follows from its content."""
    files: dict[str, RepoFile] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        content = path.read_bytes()
        git_oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        is_lfs = path.suffix in LFS_SUFFIXES
        sha256 = hashlib.sha256(content).hexdigest() if is_lfs else None
        files[name] = RepoFile(name, content, git_oid, sha256)
    commit = hashlib.sha1(repo_id.encode())
    for name, file in files.items():
        commit.update(f"{name}\0{file.etag}\0".encode())
    return Repo(repo_id, commit.hexdigest(), files)


class HubEmulator:
    """The server; start it with `running_hub` or `start()` / `stop()`."""

    def __init__(self, throttle_bytes_per_s: int | None = None) -> None:
        self.repos: dict[str, Repo] = {}
        self.throttle_bytes_per_s = throttle_bytes_per_s
        self.requests: list[ServedRequest] = []
        self._generation = 0  # bumped by reset_counts: requests that came before are not counted
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._drops: list[_Fault] = []
        self._holds: list[_Hold] = []
        self._held_now = 0
        self._next_send_at = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- repos ---------------------------------------------------------------------------

    def add_repo(self, repo_id: str, directory: Path) -> Repo:
        """Serve `directory` as model repo `repo_id` (its files as they are now)."""
        repo = load_repo(repo_id, directory)
        self.repos[repo_id] = repo
        return repo

    # -- faults --------------------------------------------------------------------------

    def drop_once(self, after_bytes: int, filename: str | None = None) -> None:
        """Close the connection after `after_bytes` of the next body of `filename` (any file)."""
        with self._lock:
            self._drops.append(_Fault(filename, after_bytes))

    def hold(self, after_bytes: int, filename: str | None = None) -> None:
        """Send no byte of `filename` (any file) past offset `after_bytes` until `release()`."""
        with self._lock:
            self._holds.append(_Hold(filename, after_bytes))

    def release(self) -> None:
        """Let every held body go on, and hold no more."""
        with self._lock:
            for hold in self._holds:
                hold.released.set()
            self._holds.clear()

    @property
    def downloads_held(self) -> int:
        """How many downloads are parked at a hold point now."""
        with self._lock:
            return self._held_now

    def wait_until_held(self, timeout_s: float = 60) -> None:
        """Block until some download is parked at a hold point."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._held_now > 0, timeout_s):
                raise TimeoutError("no download reached the hold point")

    # -- counts --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "the hub emulator is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def file_gets(self) -> list[ServedRequest]:
        """The GETs of repo files (not HEADs, not API calls)."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.filename is not None]

    @property
    def bytes_served(self) -> int:
        """File body bytes sent, all files and requests together."""
        return sum(r.body_bytes for r in self.file_gets())

    def reset_counts(self) -> None:
        """Forget what was served, and do not count requests that arrived before this call."""
        with self._lock:
            self.requests.clear()
            self._generation += 1

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- used by the handler -------------------------------------------------------------

    def _record(self, served: ServedRequest, generation: int) -> None:
        with self._changed:
            if generation == self._generation:
                self.requests.append(served)
            self._changed.notify_all()

    def _take_drop(self, filename: str) -> int | None:
        with self._lock:
            for drop in self._drops:
                if drop.filename in (None, filename):
                    self._drops.remove(drop)
                    return drop.after_bytes
        return None

    def _hold_for(self, filename: str) -> _Hold | None:
        with self._lock:
            return next((h for h in self._holds if h.filename in (None, filename)), None)

    def _park(self, hold: _Hold) -> None:
        with self._changed:
            self._held_now += 1
            self._changed.notify_all()
        hold.released.wait()
        with self._changed:
            self._held_now -= 1

    def _pace(self, size: int) -> None:
        """Sleep so that all connections together send at most the throttle rate."""
        rate = self.throttle_bytes_per_s
        if not rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_send_at)
            self._next_send_at = start + size / rate
        time.sleep(max(0.0, start - now))

    def _chunk_bytes(self) -> int:
        rate = self.throttle_bytes_per_s
        return max(1024, min(CHUNK_BYTES, rate // 10)) if rate else CHUNK_BYTES


@contextmanager
def running_hub(throttle_bytes_per_s: int | None = None) -> Iterator[HubEmulator]:
    """A started hub emulator, stopped (and every held download let go) on exit."""
    hub = HubEmulator(throttle_bytes_per_s)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


_API_MODELS = re.compile(r"^/api/models/(?P<rest>.+)$")
_RANGE = re.compile(r"^bytes=(?P<start>\d*)-(?P<end>\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubEmulator
    protocol_version = "HTTP/1.1"
    generation = 0

    def log_message(self, format: str, *args: object) -> None:  # the test output stays quiet
        pass

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    # -- routing -------------------------------------------------------------------------

    def _route(self, send_body: bool) -> None:
        self.generation = self.hub._generation
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        api = _API_MODELS.match(path)
        if api:
            self._api(api["rest"], query)
            return
        if "/resolve/" in path:
            self._resolve(path, send_body)
            return
        self._error(404, None, "Not Found")

    def _find_repo(self, rest: str) -> tuple[Repo | None, str]:
        """The repo whose id starts `rest`, and what follows it."""
        for repo_id, repo in self.hub.repos.items():
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return repo, rest[len(repo_id) :].lstrip("/")
        return None, rest

    def _revision_ok(self, repo: Repo, revision: str) -> bool:
        return revision in ("main", repo.sha)

    def _api(self, rest: str, query: dict[str, list[str]]) -> None:
        repo, tail = self._find_repo(rest)
        if repo is None:
            self._repo_not_found()
            return
        revision, _, subpath = "main", "", ""
        kind, _, remainder = tail.partition("/")
        if kind in ("revision", "tree"):
            revision, _, subpath = remainder.partition("/")
        elif tail:
            self._error(404, None, "Not Found")
            return
        if not self._revision_ok(repo, revision):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        if kind == "tree":
            self._json(_tree(repo, subpath, _true(query.get("recursive"))))
        else:
            self._json(_model_info(repo, with_blobs=_true(query.get("blobs"))))

    def _resolve(self, path: str, send_body: bool) -> None:
        repo_part, _, rest = path.lstrip("/").partition("/resolve/")
        repo = self.hub.repos.get(repo_part)
        if repo is None:
            self._repo_not_found()
            return
        revision, _, filename = rest.partition("/")
        if not self._revision_ok(repo, revision):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        file = repo.files.get(filename)
        if file is None:
            self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.sha})
            return
        self._send_file(repo, file, send_body)

    # -- answers -------------------------------------------------------------------------

    def _send_file(self, repo: Repo, file: RepoFile, send_body: bool) -> None:
        range_header = self.headers.get("Range")
        start, end = 0, file.size - 1
        status = 200
        if range_header:
            wanted = _RANGE.match(range_header.strip())
            if wanted is None or not wanted["start"] or int(wanted["start"]) >= file.size:
                self._error(416, None, "Range Not Satisfiable")
                return
            start = int(wanted["start"])
            end = min(int(wanted["end"]), end) if wanted["end"] else end
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{file.etag}"')
        self.send_header("X-Repo-Commit", repo.sha)
        if file.sha256 is not None:
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("X-Linked-Size", str(file.size))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{file.size}")
        self.end_headers()
        sent = self._send_body(file, start, end + 1) if send_body else 0
        method = "GET" if send_body else "HEAD"
        served = ServedRequest(method, self.path, status, range_header, sent, file.path)
        self.hub._record(served, self.generation)

    def _send_body(self, file: RepoFile, start: int, stop: int) -> int:
        """Send file bytes [start, stop), obeying throttle, drop and hold; the count sent."""
        drop_after = self.hub._take_drop(file.path)
        hold = self.hub._hold_for(file.path)
        sent = 0
        position = start
        try:
            while position < stop:
                size = min(self.hub._chunk_bytes(), stop - position)
                if drop_after is not None and sent < drop_after:
                    size = min(size, drop_after - sent)
                if hold is not None and position < hold.after_bytes:
                    size = min(size, hold.after_bytes - position)
                if hold is not None and position >= hold.after_bytes:
                    self.wfile.flush()
                    self.hub._park(hold)
                    hold = None
                if drop_after is not None and sent >= drop_after:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the socket closes mid-body, as a network drop
                    return sent
                self.hub._pace(size)
                self.wfile.write(file.content[position : position + size])
                position += size
                sent += size
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True
        return sent

    def _json(self, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.hub._record(
            ServedRequest(self.command, self.path, 200, None, 0, None), self.generation
        )

    def _repo_not_found(self) -> None:
        self._error(404, "RepoNotFound", "Repository not found")

    def _error(
        self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub._record(
            ServedRequest(self.command, self.path, status, None, 0, None), self.generation
        )


def _true(values: list[str] | None) -> bool:
    return values is not None and values[-1].lower() in ("1", "true")


def _model_info(repo: Repo, with_blobs: bool) -> dict[str, object]:
    siblings: list[dict[str, object]] = []
    for file in repo.files.values():
        sibling: dict[str, object] = {"rfilename": file.path}
        if with_blobs:
            sibling["size"] = file.size
            sibling["blobId"] = file.git_oid
            if file.sha256 is not None:
                sibling["lfs"] = {
                    "size": file.size,
                    "sha256": file.sha256,
                    "pointerSize": LFS_POINTER_SIZE,
                }
        siblings.append(sibling)
    namespace = repo.repo_id.split("/")[0]
    return {
        "_id": repo.sha[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": namespace,
        "sha": repo.sha,
        "lastModified": LAST_MODIFIED,
        "createdAt": LAST_MODIFIED,
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "library_name": "transformers",
        "siblings": siblings,
        "usedStorage": repo.size,
    }


def _tree(repo: Repo, subpath: str, recursive: bool) -> list[dict[str, object]]:
    prefix = f"{subpath.strip('/')}/" if subpath.strip("/") else ""
    entries: list[dict[str, object]] = []
    folders: set[str] = set()
    for file in repo.files.values():
        if not file.path.startswith(prefix):
            continue
        relative = file.path[len(prefix) :]
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if folder not in folders and (recursive or depth == 1):
                folders.add(folder)
                entries.append({"type": "directory", "path": folder, "oid": repo.sha, "size": 0})
        if len(parts) > 1 and not recursive:
            continue
        entry: dict[str, object] = {
            "type": "file",
            "path": file.path,
            "size": file.size,
            "oid": file.git_oid,
        }
        if file.sha256 is not None:
            entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": LFS_POINTER_SIZE}
        entries.append(entry)
    return entries
