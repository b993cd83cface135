"""`vpotool label` and `pair --labels`: the queue, labels -> pairs, the server's guards (the labels file stays
intact after every bad request, each of which gets a 4xx), bursts of concurrent answers, one server per labels
file, the page in a browser with resume, and human pairs through train-dpo."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST

from vpotool.config import LabelConfig
from vpotool.errors import VpoError
from vpotool.manifest import read_manifest, write_manifest
from vpotool.report import label as label_module
from vpotool.report.label import LabelServer, LabelSession, build_queue, make_server
from vpotool.stages.pair import tally_labels


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real samples run: 2 prompts x 3 candidates of the tiny model (FAST settings), made through the CLI."""
    from vpotool.cli import main

    folder = tmp_path_factory.mktemp("label")
    prompts = folder / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    argv = ["vpotool", "sample", "--prompts", prompts, "--candidates", 3, "--out", folder / "run", *FAST]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exit_:
        mp.setattr(sys, "argv", [str(a) for a in argv])
        main()
    assert exit_.value.code == 0
    return folder / "run"


def samples_of(run) -> list[dict]:
    return read_manifest(run / "samples.parquet", "samples").to_pylist()


def config(run, out, **kw) -> LabelConfig:
    return LabelConfig(**{"samples": str(run / "samples.parquet"), "out": str(out), "labeler": "alice", **kw})


@contextmanager
def serving(run, out, **kw):
    """A label server on a free port (or ``port=``), in a thread; stopped and closed on exit."""
    server = make_server(config(run, out, **kw))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def call(server, path, body=None, headers=None, token=True):
    """``(status, parsed JSON or raw bytes)`` of a GET (``body`` None) or POST to ``server``."""
    headers = dict(headers or {})
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
        if token:
            headers.setdefault("X-Label-Token", server.session.token)
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url.rstrip("/") + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            status, data, kind = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, data, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, json.loads(data) if kind == "application/json" else data


# ---------------------------------------------------------------- pure: the queue and labels -> pairs


def fake_samples(prompts: int, candidates: int) -> list[dict]:
    return [
        dict(sample_id=f"p{p}-c{c}", prompt_id=f"p{p}", prompt=f"prompt {p}", candidate=c)
        for p in reversed(range(prompts))  # the manifest's order must not matter
        for c in range(candidates)
    ]


def test_queue_holds_every_two_candidates_round_robin_with_balanced_sides():
    queue = build_queue(fake_samples(10, 4))
    assert len(queue) == 10 * 6 and len({i.item_id for i in queue}) == 60
    assert [i.prompt_id for i in queue[:10]] == [f"p{p}" for p in range(10)]  # first pair of every prompt first
    assert {(i.left_id, i.right_id) for i in queue[:10]} <= {(f"p{p}-c0", f"p{p}-c1") for p in range(10)} | {
        (f"p{p}-c1", f"p{p}-c0") for p in range(10)
    }
    assert all(i.left_id.split("-")[0] == i.right_id.split("-")[0] == i.prompt_id for i in queue)
    assert build_queue(fake_samples(10, 4)) == queue  # deterministic
    lower_left = sum(i.left_id < i.right_id for i in queue) / len(queue)
    assert 0.3 < lower_left < 0.7  # sides are mixed, so position bias averages out


def test_queue_from_pairs_keeps_their_order_once_each():
    samples = fake_samples(2, 3)
    pairs = [
        dict(pair_id="a", chosen_id="p1-c2", rejected_id="p1-c0"),
        dict(pair_id="b", chosen_id="p0-c1", rejected_id="p0-c0"),
        dict(pair_id="c", chosen_id="p1-c0", rejected_id="p1-c2"),  # the same two samples as "a"
    ]
    queue = build_queue(samples, pairs)
    assert [{i.left_id, i.right_id} for i in queue] == [{"p1-c2", "p1-c0"}, {"p0-c1", "p0-c0"}]
    with pytest.raises(VpoError, match="not in --samples"):
        build_queue(samples, [dict(pair_id="x", chosen_id="p9-c0", rejected_id="p0-c0")])


def label(left, right, choice, labeler="alice", prompt_id="p0"):
    return dict(label_id=f"{left}|{right}|{labeler}", prompt_id=prompt_id, left_id=left, right_id=right,
                choice=choice, labeler=labeler)  # fmt: skip


def test_labels_to_pairs_votes_and_margins():
    labels = [
        label("a", "b", "left"),  # one vote: margin 1
        label("d", "c", "right"),
        label("d", "c", "right", "bob"),  # agreeing labellers: still margin 1
        label("e", "f", "left"),
        label("f", "e", "left", "bob"),  # disagreeing (sides swapped): no pair
        label("g", "h", "left"),
        label("g", "h", "tie", "bob"),  # a tie dilutes: scores 1/2 and 0
        label("i", "j", "left"),
        label("j", "i", "left", "bob"),
        label("i", "j", "left", "carol"),  # 2 of 3 votes: scores 2/3 and 1/3
        label("k", "l", "tie"),
        label("m", "n", "skip"),
        label("o", "p", "skip"),
        label("o", "p", "right", "bob"),  # a skip is no vote
    ]
    pairs = {(p["chosen_id"], p["rejected_id"]): p for p in tally_labels(labels)}
    assert sorted(pairs) == [("a", "b"), ("c", "d"), ("g", "h"), ("i", "j"), ("p", "o")]
    assert pairs[("a", "b")]["margin"] == pairs[("c", "d")]["margin"] == pairs[("p", "o")]["margin"] == 1.0
    assert (pairs[("g", "h")]["chosen_score"], pairs[("g", "h")]["rejected_score"]) == (0.5, 0.0)
    assert pairs[("g", "h")]["margin"] == 0.5
    assert pairs[("i", "j")]["chosen_score"] == pytest.approx(2 / 3)
    assert pairs[("i", "j")]["margin"] == pytest.approx(1 / 3)
    with pytest.raises(VpoError, match="'maybe'"):
        tally_labels([label("a", "b", "maybe")])


# ---------------------------------------------------------------- the server


def test_server_answers_resumes_and_rejects_bad_input_without_touching_the_file(run, tmp_path):
    out = tmp_path / "labels.parquet"
    queue = build_queue(samples_of(run))
    with serving(run, out) as server:
        status, state = call(server, "/api/next")
        assert status == 200 and (state["answered"], state["total"]) == (0, 6)
        first = state["item"]
        assert (first["item_id"], first["left"]["id"], first["right"]["id"]) == (
            queue[0].item_id, queue[0].left_id, queue[0].right_id,
        )  # fmt: skip
        status, video = call(server, first["left"]["url"])
        assert status == 200 and video == (run / "videos" / f"{queue[0].left_id}.mp4").read_bytes()
        assert read_manifest(out, "labels").num_rows == 0  # the file exists from the start

        status, reply = call(server, "/api/label", {"item_id": first["item_id"], "choice": "right"})
        assert status == 200 and reply["stored"] and reply["answered"] == 1
        assert reply["item"]["item_id"] == queue[1].item_id
        saved = out.read_bytes()

        item = {"item_id": queue[1].item_id}
        bad = [  # (path, body, headers, token, expected status)
            ("/api/label", {"item_id": "p00000-c00|nope", "choice": "left"}, {}, True, 404),
            ("/api/label", {"item_id": 3, "choice": "left"}, {}, True, 400),
            ("/api/label", [item], {}, True, 400),
            ("/api/label", b"{not json", {}, True, 400),
            ("/api/label", b"\xff\xfe", {}, True, 400),
            ("/api/label", {**item, "choice": "LEFT"}, {}, True, 400),
            ("/api/label", {**item, "choice": None}, {}, True, 400),
            ("/api/label", {**item, "choice": "left", "pad": "x" * 5000}, {}, True, 413),
            ("/api/label", {**item, "choice": "left"}, {}, False, 403),  # no token
            ("/api/label", {**item, "choice": "left"}, {"X-Label-Token": "guess"}, False, 403),
            ("/api/label", {**item, "choice": "left"}, {"Origin": "http://evil.example"}, True, 403),
            ("/api/label", {**item, "choice": "left"}, {"Host": "evil.example"}, True, 403),
            ("/api/nope", {**item, "choice": "left"}, {}, True, 404),
            ("/", None, {"Host": f"evil.example:{server.server_address[1]}"}, True, 403),  # DNS rebinding
            ("/api/next", None, {"Host": "evil.example"}, True, 403),
            ("/samples.parquet", None, {}, True, 404),
            ("/videos/p00000-c00.mp4", None, {}, True, 404),
            ("/video/../samples.parquet", None, {}, True, 404),
            ("/video/..%2Fsamples.parquet", None, {}, True, 404),
            ("/video/%2E%2E%2F%2E%2E%2Fprompts.txt", None, {}, True, 404),
            ("/video/videos%2Fp00000-c00.mp4", None, {}, True, 404),
            ("/video/" + str(run / "videos" / "p00000-c00.mp4"), None, {}, True, 404),
        ]
        for path, body, headers, token, expected in bad:
            status, reply = call(server, path, body, headers, token)
            assert status == expected, (path, body, headers, reply)
            assert isinstance(reply, dict) and reply["error"], (path, body)
            assert out.read_bytes() == saved, (path, body)

        # A double submit (e.g. a double click) keeps the first answer and writes no second row.
        status, reply = call(server, "/api/label", {"item_id": queue[0].item_id, "choice": "left"})
        assert status == 200 and not reply["stored"] and reply["label"]["choice"] == "right"
        assert out.read_bytes() == saved

        # Racing requests for one item: exactly one is stored.
        results = []
        body = {"item_id": queue[1].item_id, "choice": "tie"}
        threads = [threading.Thread(target=lambda: results.append(call(server, "/api/label", body))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r[1]["stored"] for r in results) == [False] * 5 + [True]

    rows = pd.read_parquet(out)
    assert list(rows.choice) == ["right", "tie"] and list(rows.labeler) == ["alice", "alice"]
    assert list(rows.left_id) == [queue[0].left_id, queue[1].left_id]
    assert rows.labelled_at.str.endswith("+00:00").all()
    assert (out.parent / rows.left_video[0]).resolve() == (run / "videos" / f"{queue[0].left_id}.mp4").resolve()

    with serving(run, out) as server:  # a restart resumes at the first unanswered item
        assert call(server, "/api/next")[1]["item"]["item_id"] == queue[2].item_id
    with serving(run, out, labeler="bob") as server:  # another labeller starts from the top of the same queue
        assert call(server, "/api/next")[1]["item"]["item_id"] == queue[0].item_id


def test_label_cli_prints_the_url_stops_on_ctrl_c_and_warns_off_loopback(cli, run, tmp_path, monkeypatch):
    from vpotool.report.label import LabelServer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(LabelServer, "serve_forever", interrupted)
    out = tmp_path / "labels.parquet"
    code, stdout, err = cli("label", "--samples", run / "samples.parquet", "--out", out, "--labeler", "alice")
    assert code == 0 and "wrote" in stdout and "http://127.0.0.1:" in err and "0 of 6" in err
    assert "warning" not in err and read_manifest(out, "labels").num_rows == 0
    code, _, err = cli("label", "--samples", run / "samples.parquet", "--out", out, "--host", "0.0.0.0")
    assert code == 0 and "warning" in err and "anyone" in err

    one = [s for s in samples_of(run) if s["candidate"] == 0]
    for s in one:
        s["video"] = str(run / s["video"])
    write_manifest(tmp_path / "one.parquet", one, "samples")
    code, _, err = cli("label", "--samples", tmp_path / "one.parquet", "--out", out)
    assert code == 2 and "nothing to label" in err and "--candidates" in err
    code, _, err = cli("label", "--samples", run / "samples.parquet", "--out", out, "--port", 70000)
    assert code == 2 and "--port" in err


def test_label_on_a_port_in_use_says_so_in_one_line_and_leaves_no_labels_file(cli, run, tmp_path):
    out = tmp_path / "labels.parquet"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ("--samples", run / "samples.parquet", "--out", out, "--host", "127.0.0.1", "--port", port)
        code, stdout, err = cli("label", *args)
    assert code == 2 and not stdout and len(err.strip().splitlines()) == 1, err
    assert f"127.0.0.1:{port}" in err and "in use" in err and "--port" in err
    assert not out.exists() and not list(tmp_path.iterdir())  # no labels file, no lock file, no temp


def raw(server, head: str, body: bytes = b"", close_write=False, timeout=5.0) -> tuple[int, bytes, float]:
    """Send ``head`` (a request line and headers, ``\n``-separated, no blank line) and ``body`` over a bare
    socket, as no well-behaved client would; ``(status, reply body, seconds until the reply)``."""
    request = head.replace("\n", "\r\n").encode("utf-8") + b"\r\n\r\n" + body
    start = time.monotonic()
    with socket.create_connection(server.server_address, timeout=timeout) as sock:
        sock.sendall(request)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply, f"the connection to {head.splitlines()[0]!r} was dropped without an answer"
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2], time.monotonic() - start


def test_server_answers_every_malformed_request_with_a_4xx_and_bounds_its_waits(run, tmp_path, monkeypatch):
    monkeypatch.setattr(label_module, "BODY_TIMEOUT", 0.5)
    out, item_id = tmp_path / "labels.parquet", build_queue(samples_of(run))[0].item_id
    with serving(run, out) as server:
        saved, token, port = out.read_bytes(), server.session.token, server.server_address[1]
        host = f"Host: 127.0.0.1:{port}"
        json_post = f"POST /api/label HTTP/1.1\n{host}\nX-Label-Token: {token}\nContent-Type: application/json"
        answer = json.dumps({"item_id": item_id, "choice": "left"}).encode()
        nested = [b"[" * 4096, b"[" * 2048 + b"]" * 2048, b'{"a":' * 600 + b"1" + b"}" * 600]
        cases = [  # (head, body, close_write, expected status)
            *[(f"{json_post}\nContent-Length: {len(b)}", b, False, 400) for b in nested],  # RecursionError before
            (json_post.replace(token, "t\u00f6ken\u4ee4") + "\nContent-Length: 2", b"{}", False, 403),  # TypeError
            (json_post.replace(token, token + "\u00ff") + "\nContent-Length: 2", b"{}", False, 403),
            (f"{json_post}\nContent-Length: 100", answer[:10], False, 408),  # hung 30 s before
            (f"{json_post}\nContent-Length: 100", answer[:10], True, 400),  # the client closed its side
            (f"{json_post}\nContent-Length: {10**12}", b"", False, 413),
            (f"{json_post}\nContent-Length: 9000", b"x" * 9000, False, 413),
            (f"{json_post}\nContent-Length: -1", b"", False, 400),
            (f"{json_post}\nContent-Length: 1e3", b"", False, 400),
            (json_post, answer, False, 411),
            (f"{json_post}\nTransfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n", False, 411),
            (
                json_post.replace("application/json", "text/plain") + f"\nContent-Length: {len(answer)}",
                answer,
                False,
                415,
            ),
            (
                json_post.replace("\nContent-Type: application/json", f"\nContent-Length: {len(answer)}"),
                answer,
                False,
                415,
            ),
            (json_post.replace("/api/label", "//[x") + f"\nContent-Length: {len(answer)}", answer, False, 404),
            (f"{json_post}\nContent-Length: {len(answer) + 4}", b"\xff\xfe" + answer + b"\x00\x00", False, 400),
            (f"GET //[x?a=%zz HTTP/1.1\n{host}", b"", False, 404),
            (f"GET /video/%ff%fe HTTP/1.1\n{host}", b"", False, 404),
            (f"PUT /api/label HTTP/1.1\n{host}\nContent-Length: {len(answer)}", answer, False, 405),
            (f"DELETE /api/label HTTP/1.1\n{host}", b"", False, 405),
            (f"HEAD / HTTP/1.1\n{host}", b"", False, 405),
            (f"BREW /api/label HTTP/1.1\n{host}", b"", False, 405),
            ("HELLO", b"", False, 400),
            (f"GET / HTTP/1.1\n{host}\n" + "\n".join(f"X-{i}: {i}" for i in range(120)), b"", False, 431),
        ]
        for head, body, close_write, expected in cases:
            status, reply, seconds = raw(server, head, body, close_write)
            assert status == expected, (head[-60:], body[:40], reply)
            assert seconds < 3, (head[-60:], seconds)  # BODY_TIMEOUT is 0.5 s here
            if expected not in (400, 431) or head.startswith("POST"):
                assert json.loads(reply)["error"], (head[-60:], reply)
            assert out.read_bytes() == saved, (head[-60:], body[:40])

        status, reply, _ = raw(server, f"{json_post}\nContent-Length: {len(answer)}", answer)  # still serving
        assert status == 200 and json.loads(reply)["stored"]
    assert list(pd.read_parquet(out).choice) == ["left"]


def test_videos_are_served_in_byte_ranges(run, tmp_path):
    out, first = tmp_path / "labels.parquet", build_queue(samples_of(run))[0].left_id
    video = (run / "videos" / f"{first}.mp4").read_bytes()
    size, url = len(video), f"/video/{first}"
    with serving(run, out) as server:

        def get(range_=None):
            headers = {"Range": range_} if range_ else {}
            request = urllib.request.Request(server.url.rstrip("/") + url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    return r.status, r.headers, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read()

        status, headers, body = get()
        assert status == 200 and body == video and headers["Accept-Ranges"] == "bytes"
        for asked, (a, b) in [
            ("bytes=10-99", (10, 99)),
            ("bytes=0-0", (0, 0)),
            (f"bytes=100-{size * 2}", (100, size - 1)),  # a last byte past the end is cut to it
            ("bytes=100-", (100, size - 1)),
            ("bytes=-50", (size - 50, size - 1)),
            (f"bytes=-{size * 2}", (0, size - 1)),
            ("BYTES = 5 - 9", (5, 9)),
        ]:
            status, headers, body = get(asked)
            assert status == 206 and body == video[a : b + 1], asked
            assert headers["Content-Range"] == f"bytes {a}-{b}/{size}" and headers["Content-Length"] == str(b - a + 1)
            assert headers["Accept-Ranges"] == "bytes" and headers["Content-Type"] == "video/mp4"
        bad = [f"bytes={size}-", f"bytes={size}-{size + 9}", "bytes=-0", "bytes=9-5", "bytes=a-b", "bytes=-", "bytes=",
               "bytes=1-2-3", "bytes=+1-2", "bytes=\u00b2-5"]  # fmt: skip
        for asked in bad:
            status, headers, body = get(asked)
            assert status == 416 and headers["Content-Range"] == f"bytes */{size}", asked
            assert json.loads(body)["error"], asked
        for ignored in ("items=0-5", "bytes=0-1,5-9"):  # another unit, several ranges: the whole video
            status, headers, body = get(ignored)
            assert status == 200 and body == video, ignored


def test_a_client_that_drops_a_video_midway_leaves_no_traceback(run, tmp_path, capfd, monkeypatch):
    big = tmp_path / "big.mp4"  # far more than the sockets buffer, so the server is mid-write when the client goes
    big.write_bytes(bytes(range(256)) * (64 << 12))  # 64 MiB
    rows = [{**s, "video": str(big)} for s in samples_of(run)]
    write_manifest(tmp_path / "big.parquet", rows, "samples")
    errors = []
    handle_error = LabelServer.handle_error
    monkeypatch.setattr(LabelServer, "handle_error", lambda *a: errors.append(sys.exc_info()[0]) or handle_error(*a))
    with serving(run, tmp_path / "labels.parquet", samples=str(tmp_path / "big.parquet")) as server:
        port = server.server_address[1]
        for range_ in ("", "Range: bytes=1000-\r\n"):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(server.server_address)
            sock.sendall(
                f"GET /video/{rows[0]['sample_id']} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{range_}\r\n".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.0 20")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, as a tab closes
            sock.close()
        assert call(server, "/api/next")[0] == 200  # still serving
    assert len(errors) == 2 and all(issubclass(e, ConnectionError) for e in errors)  # the server did see them go
    assert capfd.readouterr().err == ""


def many_candidates(run, tmp_path, candidates: int) -> Path:
    """A samples manifest of the run's 2 prompts with ``candidates`` each (reusing its videos): many items."""
    rows = samples_of(run)
    more = [
        {**s, "sample_id": f"{s['prompt_id']}-c{k:02d}", "candidate": k, "video": str(run / s["video"])}
        for s in rows
        if s["candidate"] == 0
        for k in range(candidates)
    ]
    write_manifest(tmp_path / "many.parquet", more, "samples")
    return tmp_path / "many.parquet"


def test_a_burst_of_concurrent_answers_keeps_every_acknowledged_one(run, tmp_path):
    samples = many_candidates(run, tmp_path, 8)  # 2 x 28 items
    out = tmp_path / "labels.parquet"
    queue = build_queue(read_manifest(samples, "samples").to_pylist())
    server = make_server(LabelConfig(samples=str(samples), out=str(out), labeler="alice"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    choices = ["left", "right", "tie", "skip"]
    bodies = [{"item_id": item.item_id, "choice": choices[i % 4]} for i, item in enumerate(queue[:50])]
    start, results, errors = threading.Barrier(len(bodies)), [], []

    def post(body):
        start.wait(timeout=10)
        try:
            results.append((body, *call(server, "/api/label", body)))
        except OSError as e:  # a reset connection: the answer the issue saw lost
            errors.append(e)

    try:
        began = time.monotonic()
        threads = [threading.Thread(target=post, args=(b,), daemon=True) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads) and time.monotonic() - began < 30
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert not errors, errors[:3]
    acknowledged = {r[0]["item_id"]: r[0]["choice"] for r in results if r[1] == 200 and r[2]["stored"]}
    assert len(acknowledged) == len(results) == 50
    rows = pd.read_parquet(out)
    stored = {f"{i.item_id}|alice": i.item_id for i in queue}
    assert {stored[r]: c for r, c in zip(rows.label_id, rows.choice, strict=True)} == acknowledged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.parquet", "many.parquet"]  # no temp, no lock


def test_one_label_server_per_labels_file(cli, run, tmp_path, monkeypatch):
    out = tmp_path / "labels.parquet"
    with serving(run, out) as server:
        call(server, "/api/label", {"item_id": server.session.queue[0].item_id, "choice": "left"})
        saved = out.read_bytes()
        with pytest.raises(VpoError, match="being written by another vpotool process") as refused:
            make_server(config(run, out, labeler="bob"))
        assert "another --out" in str(refused.value) and "\n" not in str(refused.value)

        monkeypatch.setattr(LabelServer, "serve_forever", lambda self: None)  # in case it were not refused
        code, stdout, err = cli("label", "--samples", run / "samples.parquet", "--out", out, "--labeler", "bob")
        assert code == 2 and not stdout and len(err.strip().splitlines()) == 1
        assert str(out) in err and "--out" in err
        assert out.read_bytes() == saved
        assert call(server, "/api/next")[1]["answered"] == 1  # the first server goes on
        monkeypatch.undo()
    with serving(run, out, labeler="bob") as server:  # freed when the first one stopped
        assert call(server, "/api/next")[1]["answered"] == 0


# ---------------------------------------------------------------- the page in a browser

STATE_JS = """return {progress: document.getElementById('progress').textContent,
    left: document.getElementById('left').dataset.sample, right: document.getElementById('right').dataset.sample,
    videos: [...document.querySelectorAll('video')].map(v => [v.readyState, v.error && v.error.code, v.videoWidth])}"""


def test_page_labels_with_mouse_and_keys_then_resumes_after_a_restart(browser, run, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for(answered, item):
        def ready(driver):
            s = driver.execute_script(STATE_JS)
            done = f"{answered} of 6" in s["progress"] and (s["left"], s["right"]) == (item.left_id, item.right_id)
            return s if done and all(ready >= 2 for ready, _, _ in s["videos"]) else None

        return WebDriverWait(browser, 15).until(ready)

    out, queue = tmp_path / "labels.parquet", build_queue(samples_of(run))
    browser.get_log("browser")  # drop what earlier tests logged
    with serving(run, out) as server:
        port = server.server_address[1]
        browser.get(server.url)
        state = wait_for(0, queue[0])
        assert all(error is None and width == 16 for _, error, width in state["videos"])  # H.264 decodes
        page = browser.find_element(By.TAG_NAME, "body").text
        for hint in ("Left is better", "Right is better", "Tie", "Skip", "Space", "T", "S"):
            assert hint in page
        browser.find_element(By.CSS_SELECTOR, "button[data-choice=left]").click()
        wait_for(1, queue[1])
        for n, key in enumerate([Keys.ARROW_RIGHT, "t", Keys.SPACE], start=2):
            ActionChains(browser).send_keys(key).perform()
            wait_for(n, queue[n])
        rows = pd.read_parquet(out)
        assert list(rows.choice) == ["left", "right", "tie", "skip"]
        assert list(zip(rows.left_id, rows.right_id, strict=True)) == [(i.left_id, i.right_id) for i in queue[:4]]
        assert set(rows.labeler) == {"alice"}

    with serving(run, out, port=port):  # the same out file, the same address: reload resumes
        browser.refresh()
        wait_for(4, queue[4])
        ActionChains(browser).send_keys(Keys.ARROW_DOWN).perform()
        wait_for(5, queue[5])
    assert list(pd.read_parquet(out).choice) == ["left", "right", "tie", "skip", "tie"]
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe


# ---------------------------------------------------------------- pair --labels and train-dpo


def test_pair_from_labels_mixes_with_scores_and_trains_dpo(cli, run, tmp_path):
    samples, out = run / "samples.parquet", tmp_path / "labels.parquet"
    queue = build_queue(samples_of(run))
    answers = {"alice": ["left", "right", "tie", "skip", "left"], "bob": ["left", "left", "tie", "skip", "tie"]}
    for labeler, choices in answers.items():  # one file per person, as the server writes them, then merged
        session = LabelSession(config(run, tmp_path / labeler / "labels.parquet", labeler=labeler))
        for item, choice in zip(queue, choices, strict=False):
            session.answer(item, choice)
    files = [tmp_path / name / "labels.parquet" for name in answers]
    assert cli("merge", *files, "--out", out)[0] == 0
    merged = read_manifest(out, "labels").to_pylist()
    assert len(merged) == 10 and all((tmp_path / r["left_video"]).is_file() for r in merged)

    human = tmp_path / "human.parquet"
    code, _, err = cli("pair", "--samples", samples, "--labels", out, "--out", human)
    assert code == 0, err
    pairs = pd.read_parquet(human)
    expected = {(queue[0].left_id, queue[0].right_id, 1.0), (queue[4].left_id, queue[4].right_id, 0.5)}
    assert set(zip(pairs.chosen_id, pairs.rejected_id, pairs.margin, strict=True)) == expected
    assert set(pairs.source) == {"human"} and pairs.pair_id.str.endswith(":human").all()
    for p in pairs.itertuples():
        assert (tmp_path / p.chosen_video).is_file() and (tmp_path / p.rejected_latent).is_file()

    scores, mixed = tmp_path / "scores.parquet", tmp_path / "mixed.parquet"
    assert cli("score", "--samples", samples, "--reward", "temporal", "--out", scores)[0] == 0
    code, _, err = cli("pair", "--samples", samples, "--scores", scores, "--labels", out, "--out", mixed)
    assert code == 0, err
    both = pd.read_parquet(mixed)
    assert sorted(both.source.value_counts().items()) == [("human", 2), ("temporal", 2)]
    assert both.pair_id.is_unique

    args = ("--max-steps", 1, "--batch-size", 2, "--lora-rank", 2, "--beta", 100, "--device", "cpu")
    for pairs_file in (human, mixed):
        dpo = tmp_path / f"dpo-{pairs_file.stem}"
        code, _, err = cli("train-dpo", "--pairs", pairs_file, "--out", dpo, *args)
        assert code == 0, err
        assert (dpo / "checkpoints" / "step-1" / "pytorch_lora_weights.safetensors").is_file()
        assert list(pd.read_parquet(dpo / "metrics.parquet").step) == [1]


def test_pair_needs_scores_or_labels_and_matching_samples(cli, run, tmp_path):
    code, _, err = cli("pair", "--samples", run / "samples.parquet", "--out", tmp_path / "p.parquet")
    assert code == 2 and "--scores is required (or --labels" in err
    rows = [label("x-c0", "x-c1", "left")]
    rows = [{**r, "prompt": "p", "labelled_at": "", "left_video": "", "right_video": ""} for r in rows]
    write_manifest(tmp_path / "labels.parquet", rows, "labels")
    code, _, err = cli("pair", "--samples", run / "samples.parquet", "--labels", tmp_path / "labels.parquet",
                       "--out", tmp_path / "p.parquet")  # fmt: skip
    assert code == 2 and "not in" in err and "--samples" in err
    skipped = [{**r, "left_id": "p00000-c00", "right_id": "p00000-c01", "choice": "skip"} for r in rows]
    write_manifest(tmp_path / "labels.parquet", skipped, "labels")
    code, _, err = cli("pair", "--samples", run / "samples.parquet", "--labels", tmp_path / "labels.parquet",
                       "--out", tmp_path / "p.parquet")  # fmt: skip
    assert code == 2 and "no pairs" in err and "tie and skip" in err
