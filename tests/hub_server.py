"""An in-memory fake of the Hugging Face Hub HTTP API, for tests that drive the real huggingface_hub client.

Only the endpoints that create_repo / create_branch / upload_folder / model_info / snapshot_download /
hf_hub_download use are implemented. Every upload is answered with `uploadMode: "regular"`, so files travel
base64-encoded inside the NDJSON commit and no LFS or Xet storage server is needed.

Fault injection: a required bearer token (401 otherwise), read-only repos (403 on writes), and "fail the next N
requests of endpoint X with status S" for retry tests. Every request is logged as (method, endpoint, path).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

# (method, endpoint name, pattern on the still-percent-encoded path). Repo ids are "namespace/name".
_ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate-yaml", re.compile(r"^/api/validate-yaml$")),
    ("GET", "info", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")),
    ("POST", "preupload", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")),
    ("POST", "branch", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)$")),
    ("GET", "refs", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/refs$")),
    ("GET", "tree", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
    ("GET", "resolve", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("HEAD", "resolve", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid (the client compares it)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    read_only: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        return self.commits.get(rev) if _COMMIT_HASH.match(rev) else None


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.headers, self.body = headers or {}, body or {}


class FakeHub:
    """State and fault configuration; `url` is the endpoint to give huggingface_hub."""

    def __init__(self, token: str | None = "hf_fake_valid_token") -> None:
        self.token = token  # None: no authentication required
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str]] = []
        self._faults: dict[str, list[int]] = {}  # endpoint -> statuses to answer with, in order
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ control

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fail_next(self, endpoint: str, times: int, status: int = 503) -> None:
        """Answer the next `times` requests to `endpoint` (e.g. "commit") with `status`."""
        with self._lock:
            self._faults.setdefault(endpoint, []).extend([status] * times)

    def count(self, endpoint: str, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for m, e, _ in self.requests if e == endpoint and (method is None or m == method))

    def add_repo(self, repo_id: str, *, private: bool = False, read_only: bool = False) -> Repo:
        """Create a repo directly (e.g. one the test user may read but not write)."""
        with self._lock:
            return self._create_repo(repo_id, private=private, read_only=read_only)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self._lock:
            commit = self.repos[repo_id].resolve(rev)
            assert commit is not None
            return dict(commit.files)

    # ------------------------------------------------------------------ state changes (lock held)

    def _new_oid(self, *parts: str) -> str:
        return hashlib.sha1("\0".join([str(next(self._counter)), *parts]).encode()).hexdigest()

    def _create_repo(self, repo_id: str, *, private: bool, read_only: bool = False) -> Repo:
        # Like the real Hub, a new repo starts with one commit holding .gitattributes.
        repo = Repo(repo_id=repo_id, private=private, read_only=read_only)
        first = Commit(self._new_oid(repo_id, "initial"), "initial commit", {".gitattributes": GITATTRIBUTES})
        repo.commits[first.oid] = first
        repo.branches["main"] = first.oid
        self.repos[repo_id] = repo
        return repo

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _check_write(self, repo: Repo) -> None:
        if repo.read_only:
            raise HttpError(403, f"You don't have write access to {repo.repo_id}")

    # ------------------------------------------------------------------ request handling

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        split = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        endpoint, params = "unknown", {}
        for route_method, name, pattern in _ROUTES:
            match = pattern.match(split.path)
            if match and route_method == method:
                endpoint = name
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                break
        with self._lock:
            self.requests.append((method, endpoint, split.path))
            faults = self._faults.get(endpoint)
            fault = faults.pop(0) if faults else None
        try:
            if fault is not None:
                raise HttpError(fault, f"Injected fault {fault} on {endpoint}")
            self._authenticate(headers)
            if endpoint == "unknown":
                raise HttpError(404, f"Fake Hub does not implement {method} {split.path}")
            with self._lock:
                return getattr(self, "_on_" + endpoint.replace("-", "_"))(method, params, query, body)
        except HttpError as e:
            extra = dict(e.headers)
            extra["X-Error-Message"] = e.message
            if e.error_code:
                extra["X-Error-Code"] = e.error_code
            return _json(e.status, {"error": e.message, **e.body}, extra)

    def _authenticate(self, headers: Any) -> None:
        if self.token is None:
            return
        auth = headers.get("Authorization") or ""
        if not auth:
            raise HttpError(401, "Invalid username or password.")
        if auth != f"Bearer {self.token}":
            raise HttpError(401, "Invalid credentials in Authorization header")

    def _on_create(self, method: str, params: dict, query: dict, body: bytes):
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise HttpError(400, "Fake Hub only supports model repos")
        repo_id = f"{payload.get('organization')}/{payload['name']}" if payload.get("organization") else None
        if repo_id is None:
            raise HttpError(400, "Fake Hub needs a namespace in repo ids")
        existing = self.repos.get(repo_id)
        if existing is not None and existing.read_only:
            raise HttpError(403, f"You don't have the rights to create a model under the namespace {repo_id}")
        url = f"{self.url}/{repo_id}"
        if existing is not None:
            # The client reads "url" from the 409 body too (create_repo(exist_ok=True)).
            raise HttpError(409, "You already created this model repo", body={"url": url})
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self._create_repo(repo_id, private=private)
        return _json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _on_validate_yaml(self, method: str, params: dict, query: dict, body: bytes):
        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", content, re.DOTALL)
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as e:
                return _json(400, {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []})
            if meta is not None and not isinstance(meta, dict):
                return _json(400, {"errors": [{"message": "Metadata must be a mapping"}], "warnings": []})
        return _json(200, {"errors": [], "warnings": []})

    def _on_info(self, method: str, params: dict, query: dict, body: bytes):
        repo = self._repo(params["repo"])
        commit = self._commit_at(repo, params.get("rev", "main"))
        return _json(
            200,
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            },
        )

    def _on_preupload(self, method: str, params: dict, query: dict, body: bytes):
        repo = self._repo(params["repo"])
        self._check_write(repo)
        commit = self._commit_at(repo, params["rev"])
        files = json.loads(body)["files"]
        answer = []
        for entry in files:
            existing = commit.files.get(entry["path"])
            answer.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",  # no LFS/Xet: content comes inline in the commit
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        return _json(200, {"files": answer, "commitOid": commit.oid})

    def _on_commit(self, method: str, params: dict, query: dict, body: bytes):
        repo = self._repo(params["repo"])
        self._check_write(repo)
        branch = params["rev"]
        if query.get("create_pr"):
            raise HttpError(400, "Fake Hub does not support pull requests")
        if branch not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        head = repo.commits[repo.branches[branch]]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "First line of the commit must be the header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != head.oid:
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HttpError(400, "Fake Hub only accepts base64 file content")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HttpError(404, "A file with this name doesn't exist")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:
                raise HttpError(400, f"Fake Hub does not support '{key}' operations (LFS/Xet)")
        commit = Commit(self._new_oid(repo.repo_id, header.get("summary", "")), header.get("summary", ""), files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return _json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            },
        )

    def _on_branch(self, method: str, params: dict, query: dict, body: bytes):
        repo = self._repo(params["repo"])
        self._check_write(repo)
        name = params["rev"]
        if name in repo.branches:
            raise HttpError(409, f"Reference refs/heads/{name} already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[name] = self._commit_at(repo, start).oid
        return _json(200, {})

    def _on_refs(self, method: str, params: dict, query: dict, body: bytes):
        repo = self._repo(params["repo"])
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in repo.branches.items()
        ]
        return _json(200, {"branches": branches, "converts": [], "tags": []})

    def _on_tree(self, method: str, params: dict, query: dict, body: bytes):
        repo = self._repo(params["repo"])
        commit = self._commit_at(repo, params["rev"])
        base = params.get("path", "").strip("/")
        prefix = base + "/" if base else ""
        recursive = query.get("recursive", "").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for path, content in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # Folders on the way to the file are listed too, as the Hub does.
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                folder_oid = hashlib.sha1(folder.encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": folder_oid, "path": folder})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path}
        if base and not entries:
            raise HttpError(404, f"{base} does not exist", "EntryNotFound")
        return _json(200, list(entries.values()))

    def _on_resolve(self, method: str, params: dict, query: dict, body: bytes):
        repo = self._repo(params["repo"])
        commit = self._commit_at(repo, params["rev"])
        content = commit.files.get(params["path"])
        if content is None:
            raise HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(content)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "none",
        }
        return 200, headers, content


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled session expects
    fake_hub: FakeHub

    def _serve(self) -> None:
        body = self._read_body()
        status, headers, payload = self.fake_hub.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass
