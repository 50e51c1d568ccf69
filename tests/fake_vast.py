"""A fake Vast.ai API on 127.0.0.1 that the real `vastai` SDK (and the instance's bootstrap and watchdog) talks to.

It serves the endpoints `pagating.cloud.providers.vast` uses, keeps instances in memory and records every request
(method, path, query, JSON body, Authorization header) so tests can assert what was sent.
Failures are injected per (method, path prefix) as a queue of status codes answered before the
normal reply: `fake.fail("PUT", "/api/v0/asks/", 500, 500)`.

Like Vast (docs.vast.ai: create_instance's x-input-validation; "Rate limits and errors"), it answers
400 {"success": false, "error": "invalid_args", "msg": ...} to a create request whose args +
args_str + onstart exceed 4,096 characters, an env entry 256 (all env 32,768), the label 256 or the
image 1,024; and 429 "API requests too frequent" (plain text, no Retry-After) to more than ~4.5
requests/s on one endpoint (method + path with ids folded). An offer is one machine: once rented (or
taken by someone else between search and create: `fake.taken.add(id)`) it leaves the search answer and
a create on it is answered 400 {"success": false, "error": "no_such_ask"}. A create without `image` is
400 invalid_args (docs.vast.ai "Creating Instances with the API": image is required unless a
template_hash_id is given). Every request but the offer search and the log download needs a Bearer key
(docs.vast.ai "Authentication": every request carries one; a missing, bad or under-scoped key gets
401/403): none is 401. An instance's own key (`container-key-<id>`, what its CONTAINER_API_KEY is here)
acts on that instance only (DESIGN.md, from Vast's docs: it can only start/stop/destroy its instance):
anything else is 403. DELETE answers {"success":
true, "msg": "Instance destroyed successfully"} (docs.vast.ai destroy-instance), 404 no_such_instance
for an instance that is gone, and 401 for a key in `refused_keys`. New instances sit in `loading` until
a test moves them (`fake.instances[id]["actual_status"] = "running"`); `on_create(iid, body)` and
`on_destroy(iid)` let a test boot the instance (the simulation) or end its container, as Vast would.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict
    body: dict | None
    auth: str | None
    status: int = 0  # what the fake answered (0: the normal reply)
    t: float = field(default_factory=time.time)


def instance_key(iid: int) -> str:
    """The CONTAINER_API_KEY the fake gives instance `iid` (tests pass it as the instance's env)."""
    return f"container-key-{iid}"


def offer(id: int, dph: float, gpu: str = "RTX 4090", **kw) -> dict:
    """An offer row shaped like the /bundles/ answer (the fields pagating reads)."""
    row = {"id": id, "ask_contract_id": id, "machine_id": 1000 + id, "gpu_name": gpu, "num_gpus": 1,
           "dph_total": dph, "min_bid": round(dph * 0.6, 4), "reliability": 0.99, "reliability2": 0.99,
           "inet_down": 500.0, "disk_space": 200.0, "geolocation": "Norway, NO", "cuda_max_good": 12.4,
           "verified": True, "rentable": True, "rented": False, "hosting_type": 0}
    row.update(kw)
    return row


# create_instance x-input-validation (Vast's OpenAPI spec), in characters
MAX_STARTUP, MAX_ENV_ENTRY, MAX_ENV_TOTAL, MAX_LABEL, MAX_IMAGE = 4096, 256, 32768, 256, 1024


def create_body_problem(body: dict) -> str | None:
    """What Vast's create-instance validation would refuse in `body`, or None."""
    if not body.get("image") and not body.get("template_hash_id"):
        return "image is required (or template_hash_id)"
    args = body.get("args") or []
    startup = len(body.get("onstart") or "") + len(body.get("args_str") or "") + len(" ".join(map(str, args)))
    if startup > MAX_STARTUP:
        return f"args + args_str + onstart is {startup} characters, above the {MAX_STARTUP} allowed"
    env = body.get("env") or {}
    entries = [f"{k}={v}" for k, v in env.items()] if isinstance(env, dict) else str(env).split(" -e ")
    for entry in entries:
        if len(entry) > MAX_ENV_ENTRY:
            return f"env entry {entry.split('=', 1)[0]} is {len(entry)} characters, above {MAX_ENV_ENTRY}"
    if sum(map(len, entries)) > MAX_ENV_TOTAL:
        return f"env is above {MAX_ENV_TOTAL} characters"
    if len(body.get("label") or "") > MAX_LABEL:
        return f"label is above {MAX_LABEL} characters"
    if len(body.get("image") or "") > MAX_IMAGE:
        return f"image is above {MAX_IMAGE} characters"
    return None


@dataclass
class FakeVast:
    offers: list[dict] = field(default_factory=list)
    credit: float | None = 1000.0
    requests: list[Request] = field(default_factory=list)
    instances: dict[int, dict] = field(default_factory=dict)
    log_text: str = "onstart: hello from the fake instance\n"
    # Creates that rent the instance but answer 500 (a reply lost on the way back).
    lose_create_answers: int = 0
    # Offers rented by someone else between our search and our create.
    taken: set[int] = field(default_factory=set)
    # Bearer keys refused (401) on DELETE, e.g. an instance's CONTAINER_API_KEY gone bad.
    refused_keys: set[str] = field(default_factory=set)
    # Instance keys -> the one instance each may act on (every instance gets `container-key-<id>`).
    instance_keys: dict[str, int] = field(default_factory=dict)
    on_create: Callable[[int, dict], None] | None = None
    on_destroy: Callable[[int], None] | None = None
    # Vast's per-endpoint rate (requests/s, over a 2 s window); None: no limit.
    rate_limit: float | None = 4.5
    rate_window_s: float = 2.0
    _recent: dict[str, deque] = field(default_factory=dict)
    _failures: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    _next_id: int = 5001
    _lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    # ---- test helpers -------------------------------------------------------------------------
    def fail(self, method: str, path_prefix: str, *statuses: int) -> None:
        self._failures.setdefault((method, path_prefix), []).extend(statuses)

    def calls(self, method: str, path_prefix: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    def creates(self) -> list[Request]:
        """Create requests that were answered with a new instance (not injected failures)."""
        return [r for r in self.calls("PUT", "/api/v0/asks/") if r.body and r.body.get("_created")]

    def destroys(self, instance_id: int | None = None) -> list[Request]:
        """DELETE /api/v0/instances/<id>/ requests (all ids, or one)."""
        out = []
        for r in self.calls("DELETE", "/api/v0/instances/"):
            seg = [s for s in r.path.split("/") if s]
            if len(seg) == 4 and seg[3].isdigit() and instance_id in (None, int(seg[3])):
                out.append(r)
        return out

    def add_instance(self, id: int, **kw) -> dict:
        row = {"id": id, "label": None, "actual_status": "running", "intended_status": "running",
               "cur_state": "running", "next_state": "running", "gpu_name": "RTX 4090", "num_gpus": 1,
               "dph_total": 0.4, "is_bid": False, "image_uuid": "pytorch/pytorch", "disk_space": 50,
               "machine_id": 77, "start_date": time.time() - 3600, "extra_env": [], "status_msg": ""}
        row.update(kw)
        with self._lock:
            self.instances[id] = row
            self.instance_keys[instance_key(id)] = id
        return row

    # ---- request handling ---------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, body: dict | None, auth: str | None):
        parts = urlsplit(raw_path)
        path, query = parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}
        req = Request(method, path, query, body, auth)
        with self._lock:
            self.requests.append(req)
            if self.rate_limit is not None and not path.startswith("/logs-result/"):
                key = f"{method} {re.sub(r'/[0-9]+', '/{id}', path)}"
                now = time.monotonic()
                recent = self._recent.setdefault(key, deque())
                while recent and now - recent[0] > self.rate_window_s:
                    recent.popleft()
                if len(recent) >= self.rate_limit * self.rate_window_s:
                    req.status = 429
                    return 429, f"API requests too frequent: endpoint threshold={self.rate_limit}"
                recent.append(now)
            for (m, prefix), queue in self._failures.items():
                if m == method and path.startswith(prefix) and queue:
                    return queue.pop(0), {"error": "injected", "msg": "injected failure"}
        refused = self.auth_problem(req)
        if refused:
            req.status = refused[0]
            return refused
        return self.route(req)

    def auth_problem(self, req: Request):
        """(401, ...) without a key where Vast wants one; (403, ...) for an instance key used on anything
        but its own instance; None when the key may do this."""
        if (req.method == "POST" and req.path == "/api/v0/bundles/") or req.path.startswith("/logs-result/"):
            return None  # offers can be searched without an account; the log URL is pre-signed
        key = (req.auth or "").removeprefix("Bearer ").strip()
        if not key:
            return 401, {"success": False, "error": "auth_error", "msg": "missing api key"}
        if key in self.instance_keys:
            seg = [s for s in req.path.split("/") if s]
            own = len(seg) == 4 and seg[2] == "instances" and seg[3] == str(self.instance_keys[key])
            if not own:
                return 403, {"success": False, "error": "forbidden", "msg": "this key may only manage its instance"}
        return None

    def route(self, req: Request):
        m, p, body = req.method, req.path, req.body or {}
        seg = [s for s in p.split("/") if s]
        if p.startswith("/logs-result/"):
            return 200, self.log_text
        if m == "POST" and p == "/api/v0/bundles/":
            return 200, {"offers": [dict(o) for o in self.offers if o["id"] not in self.taken]}
        if m == "GET" and p.rstrip("/") == "/api/v0/users/current":
            user = {"id": 1, "username": "tester", "api_key": "must-be-dropped-by-sdk"}
            if self.credit is not None:
                user["credit"] = self.credit
            return 200, user
        if m == "PUT" and len(seg) == 4 and seg[2] == "asks":
            offer_id = int(seg[3])
            known = {o["id"]: o for o in self.offers}
            if offer_id not in known or offer_id in self.taken:
                req.status = 400
                return 400, {"success": False, "error": "no_such_ask",
                             "msg": f"Instance type by id {offer_id} is not available."}
            invalid = create_body_problem(body)
            if invalid:
                req.status = 400
                return 400, {"success": False, "error": "invalid_args", "msg": invalid}
            o = known[offer_id]
            with self._lock:
                iid = self._next_id
                self._next_id += 1
            env = body.get("env") or {}
            self.add_instance(iid, label=body.get("label"), gpu_name=o["gpu_name"], num_gpus=o["num_gpus"],
                              dph_total=body.get("price") or o["dph_total"],
                              is_bid=body.get("price") is not None,
                              image_uuid=body.get("image"), disk_space=body.get("disk"),
                              machine_id=o["machine_id"], start_date=time.time(), actual_status="loading",
                              extra_env=[[k, v] for k, v in env.items()], onstart=body.get("onstart"))
            body["_created"] = iid
            self.taken.add(offer_id)  # one machine: rented now
            if self.on_create:
                self.on_create(iid, body)
            if self.lose_create_answers > 0:
                self.lose_create_answers -= 1
                return 500, {"error": "server_error", "msg": "lost answer"}
            return 200, {"success": True, "new_contract": iid}
        if m == "GET" and p == "/api/v1/instances/":
            with self._lock:
                rows = [dict(r) for r in self.instances.values() if not r.get("_destroyed")]
            return 200, {"instances": rows, "next_token": None, "total_instances": len(rows)}
        if len(seg) == 4 and seg[2] == "instances" and seg[3].isdigit():
            iid = int(seg[3])
            row = self.instances.get(iid)
            if m == "GET":
                return 200, {"instances": None if row is None or row.get("_destroyed") else dict(row)}
            if m == "DELETE":
                if (req.auth or "").removeprefix("Bearer ") in self.refused_keys:
                    req.status = 401
                    return 401, {"success": False, "error": "invalid_user", "msg": "unauthorized"}
                if row is None or row.get("_destroyed"):
                    req.status = 404
                    return 404, {"success": False, "error": "no_such_instance", "msg": "no such instance"}
                row["_destroyed"] = True
                if self.on_destroy:
                    self.on_destroy(iid)
                return 200, {"success": True, "msg": "Instance destroyed successfully"}
        if m == "PUT" and len(seg) == 5 and seg[2:4] == ["instances", "request_logs"]:
            return 200, {"success": True, "result_url": f"{self.url}/logs-result/{seg[4]}"}
        return 404, {"error": "not_found", "msg": f"fake vast has no {m} {p}"}


def _handler(fake: FakeVast):
    class Handler(BaseHTTPRequestHandler):
        def _do(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = {"_raw": raw.decode(errors="replace")}
            status, payload = fake.handle(self.command, self.path, body, self.headers.get("Authorization"))
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = _do

        def log_message(self, *args):  # keep pytest output clean
            pass

    return Handler


class FakeVastServer:
    """Context manager: serves `fake` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, fake: FakeVast | None = None):
        self.fake = fake or FakeVast()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.fake))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.fake.url = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> FakeVast:
        self.thread.start()
        return self.fake

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
