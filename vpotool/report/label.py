"""``vpotool label``: a local web page where a person compares two candidate videos of one prompt and answers
left, right, tie or skip. Each answer is written at once to a labels manifest; ``vpotool pair --labels`` turns
the answers into human preference pairs.

The server (stdlib ``http.server``, one thread per request) guards the labels file:

- one server per labels file: a second one on the same ``--out`` is refused (``vpotool.locks``);
- it listens on 127.0.0.1 unless told otherwise, and then answers only requests whose ``Host`` header names the
  address it serves (a page on another site that rebinds its DNS name to 127.0.0.1 is refused);
- it serves only the videos of the samples it shows, looked up by sample id, never by a path from the request,
  and answers byte ranges of them (``Range: bytes=a-b``, ``a-`` or ``-n`` -> 206 with ``Content-Range``; an
  unsatisfiable or malformed range 416), as Safari needs to play mp4 and any browser to seek;
- a client that goes away mid-answer (a browser cancels a video request as the person clicks on) ends that
  request quietly: no traceback in the terminal;
- it stores an answer only from a POST carrying the page's random token in an ``X-Label-Token`` header, and
  with an ``Origin`` header (if any) naming the served origin: another site can neither read the token nor
  send that header without a CORS preflight, which this server never grants;
- answering an item again (a double click, a second tab) is idempotent: the first answer stays and the reply
  is 200 with it (``"stored": false``), so a retried request never writes a second row;
- every malformed request gets a 4xx JSON ``{"error": ...}`` before any write, never a dropped connection: a
  body that is not JSON (or nested too deeply) or a bad choice 400, a missing or wrong token (any bytes) 403,
  unknown items 404, methods other than GET and POST 405, a body shorter than its ``Content-Length`` 408 after
  ``BODY_TIMEOUT`` seconds, no ``Content-Length`` 411, an oversized body 413, a ``Content-Type`` other than JSON
  415;
- answers are stored one at a time under a lock, each rewriting the labels file atomically (a temporary file in
  its folder, then a rename), and a reply says "stored" only once the file holds the answer; the listen backlog
  takes bursts of many concurrent requests without refusing connections.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

from vpotool.config import LabelConfig
from vpotool.errors import VpoError, first_line, one_line
from vpotool.locks import OutputLock, acquire_output_lock
from vpotool.manifest import RowWriter, read_manifest, resolve
from vpotool.report.queue import Item, build_queue
from vpotool.stages.pair import LABEL_CHOICES

LOOPBACK = ("127.0.0.1", "localhost")
MAX_BODY = 4096  # bytes: an answer is a few dozen
BODY_TIMEOUT = 5.0  # seconds to wait for a request body once its headers came (it is sent with them)
CHUNK = 1 << 16  # bytes of a video read and sent at a time
PAGE = (Path(__file__).parent / "static" / "label.html").read_text(encoding="utf-8")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes ``first``, ``last`` (inclusive) of a file of ``size`` bytes that a ``Range`` header asks for:
    ``bytes=a-b`` (``b`` past the end is cut to it), ``bytes=a-`` or ``bytes=-n`` (the last ``n``). None: send the
    whole file (no header, another unit, or several ranges, which RFC 9110 lets a server ignore). A malformed or
    unsatisfiable range is a ``ValueError`` saying why (the server answers 416)."""
    if header is None:
        return None
    unit, eq, spec = header.strip().partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    first, dash, last = (part.strip() for part in spec.partition("-"))
    numbers = [n for n in (first, last) if n]
    if not dash or not numbers or not all(n.isascii() and n.isdigit() for n in numbers):
        raise ValueError(f"malformed Range {header[:40]!r}; send bytes=FIRST-LAST, FIRST- or -SUFFIX")
    if not first:  # a suffix: the last n bytes
        if int(last) == 0 or size == 0:
            raise ValueError(f"Range {header[:40]!r} selects no bytes of the {size}-byte video")
        return max(0, size - int(last)), size - 1
    start, end = int(first), int(last) if last else size - 1
    if end < start:
        raise ValueError(f"malformed Range {header[:40]!r}: its last byte comes before its first")
    if start >= size:
        raise ValueError(f"Range {header[:40]!r} starts past the end of the {size}-byte video")
    return start, min(end, size - 1)


class LabelSession:
    """The queue, the answers written so far, and the lock that makes check-then-write of an answer atomic."""

    def __init__(self, cfg: LabelConfig):
        samples_path, self.out = Path(cfg.samples), Path(cfg.out)
        samples = read_manifest(samples_path, "samples", "--samples").to_pylist()
        pairs = read_manifest(cfg.pairs, "pairs", "--pairs").to_pylist() if cfg.pairs else None
        self.queue = build_queue(samples, pairs)
        if not self.queue:
            raise VpoError(f"nothing to label in {samples_path}: each prompt needs 2 or more candidates "
                           "(`vpotool sample --candidates 2`), or pass --pairs")  # fmt: skip
        self.items = {item.item_id: item for item in self.queue}
        shown = {sid for item in self.queue for sid in (item.left_id, item.right_id)}
        self.videos = {s["sample_id"]: resolve(samples_path, s["video"]) for s in samples if s["sample_id"] in shown}
        missing = sorted(str(p) for p in self.videos.values() if not p.is_file())
        if missing:
            raise VpoError(f"{len(missing)} video(s) of {samples_path} are missing, e.g. {missing[0]}; "
                           "label the run folder `vpotool sample` wrote, with its videos/")  # fmt: skip
        here = self.out.resolve().parent
        self.rel = {sid: os.path.relpath(path, here) for sid, path in self.videos.items()}  # as stored in a label
        self.labeler = cfg.labeler
        self.writer = RowWriter(self.out, "labels", cfg.to_dict())
        self.writer.flush()  # an empty manifest at once, so the file exists (and is writable) from the start
        self.answers = {r["label_id"]: r for r in self.writer.rows}
        self.lock = threading.Lock()
        self.token = secrets.token_urlsafe(16)

    def label_id(self, item: Item) -> str:
        return f"{item.item_id}|{self.labeler}"

    def state(self) -> dict:
        """Progress and the first item this labeler has not answered (``item`` is None when all are done)."""
        todo = [i for i, item in enumerate(self.queue) if self.label_id(item) not in self.answers]
        shown = None
        if todo:
            item = self.queue[todo[0]]
            sides = {"left": item.left_id, "right": item.right_id}
            shown = {**asdict(item), "position": todo[0] + 1}
            shown.update({side: {"id": sid, "url": "/video/" + quote(sid)} for side, sid in sides.items()})
        return dict(labeler=self.labeler, total=len(self.queue), answered=len(self.queue) - len(todo), item=shown)

    def answer(self, item: Item, choice: str) -> tuple[bool, dict]:
        """Record ``choice`` for ``item`` and rewrite the labels file; ``(False, first answer)`` if it has one."""
        label_id = self.label_id(item)
        with self.lock:
            if label_id in self.answers:
                return False, self.answers[label_id]
            row = dict(
                label_id=label_id, prompt_id=item.prompt_id, prompt=item.prompt, left_id=item.left_id,
                right_id=item.right_id, choice=choice, labeler=self.labeler,
                labelled_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                left_video=self.rel[item.left_id], right_video=self.rel[item.right_id],
            )  # fmt: skip
            self.writer.rows.append(row)
            try:
                self.writer.flush()
            except BaseException:
                self.writer.rows.pop()  # the file still holds the rows before this one
                raise
            self.answers[label_id] = row
            return True, row


class Handler(BaseHTTPRequestHandler):
    """``GET /`` the page, ``GET /api/next`` the state, ``GET /video/<sample id>``, ``POST /api/label``."""

    server: LabelServer
    timeout = 30  # seconds: a connection that sends nothing must not hold up shutdown
    default_request_version = "HTTP/1.0"  # so a garbled request line still gets a status line (HTTP/0.9 has none)

    def log_message(self, format, *args):  # quiet: the terminal shows the URL, not every request
        pass

    def send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if content_type != "video/mp4":  # state changes with every answer; videos do not
            self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, data: dict, headers: dict | None = None) -> None:
        self.send(status, json.dumps(data).encode(), "application/json", headers)

    def parse_request(self) -> bool:
        if not super().parse_request():  # a malformed request line or headers: http.server answered 400/431
            return False
        if self.command not in ("GET", "POST"):  # http.server would answer 501, a server error, for these
            self.send_json(405, {"error": f"method {self.command} not allowed"}, {"Allow": "GET, POST"})
            return False
        return True

    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0].split("#", 1)[0]  # no urlsplit: it raises on some odd paths

    def host_ok(self) -> bool:
        allowed = self.server.allowed_hosts
        return allowed is None or self.headers.get("Host", "") in allowed

    def token_ok(self) -> bool:
        sent = self.headers.get("X-Label-Token", "").encode("utf-8", "surrogateescape")  # bytes: any header
        return secrets.compare_digest(sent, self.server.session.token.encode())

    def do_GET(self):
        self.guarded(self.get)

    def do_POST(self):
        self.guarded(self.post)

    def guarded(self, handle) -> None:
        """Run ``handle``; an unexpected error still gets an answer (500) rather than a dropped connection."""
        try:
            handle()
        except (ConnectionError, TimeoutError):  # the client is gone or stalled: no one to answer
            raise
        except Exception as e:
            self.send_json(500, {"error": f"server error: {first_line(e)}; see the terminal running vpotool label"})
            raise  # socketserver prints the traceback in that terminal

    def get(self):
        session, path = self.server.session, self.route
        video = session.videos.get(unquote(path.removeprefix("/video/"))) if path.startswith("/video/") else None
        if not self.host_ok():
            self.send_json(403, {"error": "unexpected Host header; open the URL vpotool label printed"})
        elif path == "/":
            self.send(200, PAGE.replace("__TOKEN__", session.token).encode(), "text/html; charset=utf-8")
        elif path == "/api/next":
            self.send_json(200, session.state())
        elif video is not None:  # a sample id of the queue; no path from the request ever reaches the disk
            self.send_video(video)
        else:
            self.send_json(404, {"error": f"not found: {path}"})

    def send_video(self, path: Path) -> None:
        """The video at ``path``: whole (200) or the byte range the ``Range`` header asks for (206; 416 with
        ``Content-Range: bytes */SIZE`` when it cannot be met), read from the file a chunk at a time."""
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                span = byte_range(self.headers.get("Range"), size)
            except ValueError as e:
                return self.send_json(416, {"error": str(e)}, {"Content-Range": f"bytes */{size}"})
            first, last = span or (0, size - 1)
            self.send_response(206 if span else 200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(last - first + 1))
            self.send_header("Accept-Ranges", "bytes")
            if span:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            f.seek(first)
            left = last - first + 1
            while left > 0 and (chunk := f.read(min(CHUNK, left))):
                self.wfile.write(chunk)
                left -= len(chunk)

    def read_body(self) -> bytes | tuple[int, str]:
        """The request body, or ``(status, error)`` when it cannot be read within the limits."""
        value = self.headers.get("Content-Length", "").strip()
        if not value:
            return 411, "Content-Length is required"
        if not (value.isascii() and value.isdigit()):
            return 400, f"Content-Length must be a number of bytes, not {value[:20]!r}"
        length = int(value)
        if length > MAX_BODY:
            return 413, f"body over {MAX_BODY} bytes"
        body, closed, deadline = b"", False, time.monotonic() + BODY_TIMEOUT  # for the whole body: no trickling
        try:
            while len(body) < length and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.rfile.read1(length - len(body))
                if not chunk:  # the client closed its side
                    closed = True
                    break
                body += chunk
        except TimeoutError:
            pass
        finally:
            self.connection.settimeout(self.timeout)
        if len(body) < length:
            self.close_connection = True
            return 400 if closed else 408, f"body shorter than its Content-Length ({len(body)} of {length} bytes)"
        return body

    def post(self):
        session, origin = self.server.session, self.headers.get("Origin")
        if not self.host_ok() or (origin and origin != f"http://{self.headers.get('Host')}"):
            return self.send_json(403, {"error": "cross-origin request refused"})
        if not self.token_ok():
            return self.send_json(403, {"error": "missing or wrong X-Label-Token; reload the page"})
        if self.route != "/api/label":
            return self.send_json(404, {"error": f"not found: {self.route}"})
        if self.headers.get_content_type() != "application/json":
            return self.send_json(415, {"error": "Content-Type must be application/json"})
        raw = self.read_body()
        if isinstance(raw, tuple):
            return self.send_json(raw[0], {"error": raw[1]})
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: e.g. [[[[...]]]] 4096 deep
            return self.send_json(400, {"error": "body is not JSON"})
        if not isinstance(body, dict) or not isinstance(body.get("item_id"), str):
            return self.send_json(400, {"error": 'body must be {"item_id": "...", "choice": "..."}'})
        if not isinstance(body.get("choice"), str) or body["choice"] not in LABEL_CHOICES:
            return self.send_json(400, {"error": f"choice must be one of {', '.join(LABEL_CHOICES)}"})
        item = session.items.get(body["item_id"])
        if item is None:
            return self.send_json(404, {"error": f"unknown item {body['item_id']}"})
        try:
            stored, row = session.answer(item, body["choice"])
        except (OSError, VpoError) as e:  # e.g. a full disk: the file keeps the earlier answers; the page says so
            return self.send_json(500, {"error": f"could not write {session.out}: {e}"})
        self.send_json(200, {"stored": stored, "label": row, **session.state()})


class LabelServer(ThreadingHTTPServer):
    """The labelling server for one session; ``url`` is where to point a browser. It holds the output lock of the
    labels file (if given one) until ``server_close``."""

    request_queue_size = 128  # the listen backlog: a burst of requests waits for accept instead of being reset

    def __init__(self, session: LabelSession | None, host: str, port: int, lock: OutputLock | None = None):
        self.session, self.lock = session, lock  # first: a failed bind calls server_close, which reads the lock
        super().__init__((host, port), Handler)
        port = self.server_address[1]
        self.url = f"http://{host}:{port}/"
        if host == "0.0.0.0":  # every interface: the names it is reached by are unknown, so no Host check
            self.allowed_hosts = None
        else:
            self.allowed_hosts = {f"{h}:{port}" for h in {host, *(LOOPBACK if host in LOOPBACK else ())}}

    def handle_error(self, request, client_address) -> None:
        """A client that went away (a closed tab, a video request the browser cancelled) or stalled ends its
        request without a word; any other error is printed as ``socketserver`` does."""
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()  # waits for requests in flight, so an answer being written is finished
        if self.lock is not None:
            self.lock.release()


def bind(cfg: LabelConfig, lock: OutputLock) -> LabelServer:
    """The server bound to ``cfg.host:cfg.port``, without a session yet; a port in use is a one-line error."""
    try:
        return LabelServer(None, cfg.host, cfg.port, lock)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise VpoError(f"{cfg.host}:{cfg.port} is in use (another vpotool label or another program); "
                           "pass --port with a free port, or --port 0 for any free one") from e  # fmt: skip
        reason = one_line(e)
        raise VpoError(f"cannot serve on {cfg.host}:{cfg.port} ({reason}); choose another --port or --host") from e


def make_server(cfg: LabelConfig) -> LabelServer:
    """Lock ``cfg.out``, bind the server, then load the queue and labels of ``cfg`` (not yet serving; call
    ``serve_forever``, then ``server_close``, which frees the lock). Another server on ``cfg.out`` is refused.
    The address is bound first, so a port in use leaves no labels file behind."""
    lock = acquire_output_lock(cfg.out)
    server = None
    try:
        server = bind(cfg, lock)
        server.session = LabelSession(cfg)
        return server
    except BaseException:
        if server is not None:
            server.server_close()
        lock.release()  # a second release does nothing
        raise


def run_label(cfg: LabelConfig) -> Path:
    """Serve the labelling page until Ctrl-C; every answer is already in ``cfg.out`` when it is acknowledged. With
    ``cfg.judge`` a pairwise judge answers instead (:mod:`vpotool.report.judge`)."""
    from vpotool.progress import console

    if cfg.judge:
        from vpotool.report.judge import run_judge

        return run_judge(cfg)

    server = make_server(cfg)
    con, state = console(), server.session.state()
    if cfg.host not in LOOPBACK:
        warn = f"[yellow]warning:[/] serving on {cfg.host}: anyone who can reach this port can see the videos and "
        con.print(warn + "add labels; keep the default --host 127.0.0.1 (and use an SSH tunnel) unless you mean it")
    con.print(f"labelling as {state['labeler']}: {state['answered']} of {state['total']} pairs answered")
    con.print(f"open {server.url} in a browser (Ctrl-C stops; answers are saved as you go)", soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()  # waits for requests in flight, then frees the labels file
    return Path(cfg.out)
