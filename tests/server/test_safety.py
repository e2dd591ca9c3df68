"""Hostile requests against the real server (issue 14): none takes it down.

Each hostile request is followed by a good HTTP and a good gRPC request that must succeed.
The session server (tests/conftest.py) runs with embed-server's defaults (front end, no keys,
no TLS); a second, smaller server (dnabert_s only) runs once for this module with TLS, an admin
key and an API key. All traffic goes to 127.0.0.1, bounded in count and time.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import socket
import socketserver
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytestmark = pytest.mark.server

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is needed (extra 'client')")
from tritonclient.utils import InferenceServerException  # noqa: E402

from embed_server.frontend import MAX_JSON_DEPTH, classify, json_too_deep  # noqa: E402
from embed_server.launcher import LaunchError, ServerOptions  # noqa: E402

import certificates  # noqa: E402

GOOD = {"esm2": "MKTAYIAKQRQISFVKSHFSRQ", "dnabert_s": "ACGTACGGTACCATGCA"}
LIMIT = 32 * 1024 * 1024  # embed-server's default --max-request-bytes
ADMIN_KEY = "admin-" + "a1b2c3d4" * 4
API_KEY = "api-" + "f00dfeed" * 4


# ------------------------------------------------------------------ helpers


def http_bytes(method, path, body=b"", headers=(), length=True):
    """A raw HTTP/1.1 request; the server closes the connection after answering."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(port, payload, timeout=60.0, context=None):
    """Sends raw bytes, reads until the server closes; (first status or None, raw answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if context is not None:
        try:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        except (ssl.SSLError, ConnectionError):  # refused in the handshake (TLS 1.2 does it there)
            sock.close()
            return None, b""
    chunks = []
    try:
        try:
            sock.sendall(payload)
            if context is None:
                sock.shutdown(socket.SHUT_WR)  # nothing more: the server sees the end at once
        except OSError:  # the server hung up first (a refusal, or junk on the gRPC port)
            pass
        while True:
            try:
                data = sock.recv(1 << 16)
            except (ConnectionResetError, socket.timeout, ssl.SSLError):
                break
            if not data:
                break
            chunks.append(data)
    finally:
        sock.close()
    raw = b"".join(chunks)
    try:
        status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.") else None
    except (IndexError, ValueError):
        status = None
    return status, raw


def answer_json(raw):
    body = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
    try:
        return json.loads(body)
    except ValueError:
        return None


def infer_body(sequences, **tensor):
    spec = {"name": "SEQUENCE", "shape": [len(sequences), 1], "datatype": "BYTES", "data": sequences}
    spec.update(tensor)
    return json.dumps({"inputs": [spec]}).encode()


def http_port(url):
    return int(url.rsplit(":", 1)[1])


def good_http(server_url, model="esm2", headers=None, context=None):
    request = urllib.request.Request(f"{server_url}/v2/models/{model}/infer", data=infer_body([GOOD[model]]),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=60, context=context) as response:
        assert response.status == 200
        (output,) = json.loads(response.read())["outputs"]
    return output


def good_grpc(grpc_url, model="esm2", headers=None, **client_options):
    client = grpcclient.InferenceServerClient(grpc_url, **client_options)
    try:
        tensor = grpcclient.InferInput("SEQUENCE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[GOOD[model].encode()]], dtype=object))
        return client.infer(model, [tensor], headers=headers, client_timeout=60).as_numpy("EMBEDDING")
    finally:
        client.close()


def assert_serves(server):
    """The server still answers a good request on both transports."""
    output = good_http(server.http_url)
    assert output["shape"] == [1, server.hidden_sizes["esm2"]]
    assert good_grpc(server.grpc_url, "dnabert_s").shape == (1, server.hidden_sizes["dnabert_s"])


class OkBackend(socketserver.StreamRequestHandler):
    """A stand-in for tritonserver behind the front end: reads a request's head, notes it in the
    server's `served` list, answers 200 "ok" and closes the connection. With the server's
    `say_close` False the answer does not say so (HTTP/1.1 keep-alive, then closed)."""

    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.server.served.append(1)
        connection = b"Connection: close\r\n" if self.server.say_close else b""
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + connection + b"\r\nok")


@contextlib.contextmanager
def unix_backend(tmp_path, say_close=True, served=None):
    """An OkBackend on tmp_path/backend.sock, in a thread; yields the socket's path. `served`:
    a list that gets one item per request answered."""
    path = str(tmp_path / "backend.sock")
    backend = socketserver.ThreadingUnixStreamServer(path, OkBackend)
    backend.say_close, backend.served = say_close, [] if served is None else served
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        yield path
    finally:
        backend.shutdown()
        backend.server_close()


# ------------------------------------------------------------------ the reproduction (issue 14, 1)


def test_a_5_mb_form_urlencoded_body_no_longer_kills_the_server(embed_server):
    """What `curl -d @big.json` and Python's urllib send: 4.2 MB+ with this Content-Type
    SIGSEGVed tritonserver 2.51 (evhtp parses it as a query string on the stack)."""
    body = infer_body(["M" * 5_000_000])
    for content_type in ("application/x-www-form-urlencoded", None):
        headers = [f"Content-Type: {content_type}"] if content_type else []
        status, raw = exchange(http_port(embed_server.http_url),
                               http_bytes("POST", "/v2/models/esm2/infer", body, headers))
        assert status == 400, raw[:300]
        assert "5000000" in answer_json(raw)["error"]  # the model's own refusal: too long
        assert_serves(embed_server)
    # whitespace only, 4,194,303 bytes and 8 MB (the smallest and a larger one)
    for size in (4_194_303, 8 << 20):
        status, raw = exchange(http_port(embed_server.http_url), http_bytes(
            "POST", "/v2/models/esm2/infer", b" " * size, ["Content-Type: application/x-www-form-urlencoded"]))
        assert status in (400, 500), raw[:300]
        assert_serves(embed_server)


def test_the_metrics_port_is_behind_the_front_end_too(embed_server):
    """tritonserver's metrics server is evhtp as well and died of the same form body."""
    port = embed_server.metrics_port
    form = ["Content-Type: application/x-www-form-urlencoded"]
    for payload, allowed in (
        (http_bytes("POST", "/metrics", b" " * 5_000_000, form), 405),
        (http_bytes("GET", "/metrics", b" " * 5_000_000, form), 413),
        (http_bytes("GET", "/metrics", deep(2_000_000)), 413),
        (http_bytes("GET", "/v2/health/ready"), 404),
        (http_bytes("GET", "/metrics?" + "a" * 10_000), 414),
        (b"\x00" * 1000 + b"\r\n\r\n", 400),
    ):
        status, raw = exchange(port, payload)
        assert status == allowed, raw[:300]
    status, raw = exchange(port, http_bytes("GET", "/metrics"))
    assert status == 200 and b"nv_inference_count" in raw
    assert_serves(embed_server)


def test_a_body_over_the_limit_gets_413_naming_the_limit(embed_server):
    port = http_port(embed_server.http_url)
    body = infer_body(["M" * (LIMIT + 1000)])
    status, raw = exchange(port, http_bytes("POST", "/v2/models/esm2/infer", body))
    assert status == 413, raw[:300]
    assert f"{LIMIT:,}" in answer_json(raw)["error"] and "--max-request-bytes" in answer_json(raw)["error"]
    assert_serves(embed_server)
    # announced but never sent: refused at once, from the header
    status, raw = exchange(port, http_bytes("POST", "/v2/models/esm2/infer", headers=[
        "Content-Length: 1000000000000"], length=False))
    assert status == 413, raw[:300]
    # Expect: 100-continue (curl for bodies over 1 MB): refused before the body is sent
    status, raw = exchange(port, http_bytes("POST", "/v2/models/esm2/infer", headers=[
        f"Content-Length: {LIMIT + 1}", "Expect: 100-continue"], length=False))
    assert status == 413 and b"100 Continue" not in raw, raw[:300]
    assert_serves(embed_server)


def test_a_chunked_body_over_the_limit_gets_413_and_a_good_one_is_served(embed_server):
    port = http_port(embed_server.http_url)
    chunk = b"M" * (1 << 20)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 2)) + b"0\r\n\r\n"
    status, raw = exchange(port, http_bytes("POST", "/v2/models/esm2/infer", chunked,
                                            ["Transfer-Encoding: chunked"], length=False))
    assert status == 413, raw[:300]
    body = infer_body([GOOD["esm2"]])
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    status, raw = exchange(port, http_bytes("POST", "/v2/models/esm2/infer", chunked + b"0\r\n\r\n",
                                            ["Transfer-Encoding: chunked"], length=False))
    assert status == 200, raw[:300]
    assert answer_json(raw)["outputs"][0]["shape"] == [1, embed_server.hidden_sizes["esm2"]]
    # Expect: 100-continue with a body within the limit: 100, then the answer
    status, raw = exchange(port, http_bytes("POST", "/v2/models/esm2/infer", body, ["Expect: 100-continue"]))
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), raw[:300]


# ------------------------------------------------------------------ hostile HTTP


def deep(n):
    return b"[" * n + b"]" * n


def hostile_http_cases():
    """(id, raw request, the statuses it may get). 502 is never allowed: it means tritonserver
    dropped the connection."""
    infer = "/v2/models/esm2/infer"
    good = infer_body([GOOD["esm2"]])
    bad_request = (400, 404, 500)
    return [
        ("json-nested-2M", http_bytes("POST", infer, deep(2_000_000)), (400,)),  # SIGSEGV in 2.51
        ("json-nested-65", http_bytes("POST", infer, deep(MAX_JSON_DEPTH + 1)), (400,)),
        ("json-nested-in-data", http_bytes("POST", infer, b'{"inputs":[{"name":"SEQUENCE","shape":[1,1],'
                                           b'"datatype":"BYTES","data":' + deep(100_000) + b"}]}"), (400,)),
        ("json-open-brackets-only", http_bytes("POST", infer, b"{" * 3_000_000), (400,)),
        ("json-truncated", http_bytes("POST", infer, good[:-5]), bad_request),
        ("json-not-json", http_bytes("POST", infer, b"\x00\xff" * 1000), bad_request),
        ("json-empty", http_bytes("POST", infer, b""), bad_request),
        ("json-array", http_bytes("POST", infer, b"[1,2,3]"), bad_request),
        ("json-invalid-utf8", http_bytes("POST", infer, good.replace(b"MKTAY", b"MK\xff\xfeY")), bad_request),
        ("json-data-numbers", http_bytes("POST", infer, infer_body([1, 2]), ), bad_request),
        ("json-data-nested-objects", http_bytes("POST", infer, infer_body([{"a": {"b": [1]}}])), bad_request),
        ("json-shape-string", http_bytes("POST", infer, infer_body(["MK"], shape="x")), bad_request),
        ("json-shape-negative", http_bytes("POST", infer, infer_body(["MK"], shape=[-1, 1])), bad_request),
        ("json-shape-overflow", http_bytes("POST", infer, infer_body(["MK"], shape=[2 ** 40, 2 ** 40])), bad_request),
        ("json-shape-many-dims", http_bytes("POST", infer, infer_body(["MK"], shape=[1] * 10_000)), bad_request),
        ("json-shape-float", http_bytes("POST", infer, infer_body(["MK"], shape=[1.5, 1])), bad_request),
        ("json-batch-over-max", http_bytes("POST", infer, infer_body(["MK"] * 2000)), bad_request),
        ("json-datatype-fp64", http_bytes("POST", infer, infer_body(["MK"], datatype="FP64")), bad_request),
        ("json-datatype-junk", http_bytes("POST", infer, infer_body(["MK"], datatype="\u00e9" * 100)), bad_request),
        ("json-inputs-object", http_bytes("POST", infer, b'{"inputs":{"name":"SEQUENCE"}}'), bad_request),
        ("json-1000-inputs", http_bytes("POST", infer, json.dumps({"inputs": [
            {"name": f"I{i}", "shape": [1, 1], "datatype": "BYTES", "data": ["MK"]} for i in range(1000)]}).encode()),
         bad_request),
        ("json-huge-string-name", http_bytes("POST", infer, infer_body(["MK"], name="N" * 1_000_000)), bad_request),
        ("json-unknown-output", http_bytes("POST", infer, json.dumps({
            "inputs": json.loads(good)["inputs"], "outputs": [{"name": "X" * 1000}]}).encode()), bad_request),
        ("json-parameters-junk", http_bytes("POST", infer, json.dumps({
            "inputs": json.loads(good)["inputs"], "parameters": {"binary_data_output": "yes", "x": [[1]]}}).encode()),
         bad_request + (200,)),
        ("shm-input-unregistered", http_bytes("POST", infer, json.dumps({"inputs": [{
            "name": "SEQUENCE", "shape": [1, 1], "datatype": "BYTES",
            "parameters": {"shared_memory_region": "nope", "shared_memory_byte_size": 64}}]}).encode()), bad_request),
        ("binary-header-length-over-body", http_bytes("POST", infer, good, ["Inference-Header-Content-Length: 999999"]),
         bad_request),
        ("binary-bytes-length-lies", http_bytes("POST", infer, json.dumps({"inputs": [{
            "name": "SEQUENCE", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}).encode()
            + struct.pack("<I", 2 ** 31) + b"MK", [f"Inference-Header-Content-Length: {len(json.dumps({'inputs': [{'name': 'SEQUENCE', 'shape': [1, 1], 'datatype': 'BYTES', 'parameters': {'binary_data_size': 6}}]}))}"]),
         bad_request),
        ("generate-good", http_bytes("POST", "/v2/models/esm2/generate", b'{"SEQUENCE": "MKTAYIAKQ"}'),
         bad_request + (200,)),
        ("generate-junk", http_bytes("POST", "/v2/models/esm2/generate", b'{"SEQUENCE": [[[1]]], "x": {}}'),
         bad_request),
        ("generate-stream-huge", http_bytes("POST", "/v2/models/dnabert_s/generate_stream",
                                            b'{"SEQUENCE": "' + b"A" * 3_000_000 + b'"}'), bad_request + (200,)),
        ("generate-stream-empty", http_bytes("POST", "/v2/models/dnabert_s/generate_stream", b""), bad_request),
        # tritonserver refuses this one with 400/404/500 under glibc's default malloc, 405 under the CPU
        # configs' settings (launcher.CPU_MALLOC_ENV): a refusal either way, and the server goes on.
        ("unknown-model", http_bytes("POST", "/v2/models/" + "x" * 5000 + "/infer", good), bad_request + (405,)),
        ("unknown-version", http_bytes("POST", "/v2/models/esm2/versions/99999999999999999999/infer", good), bad_request),
        ("unknown-path", http_bytes("GET", "/v2/no/such/thing"), (404,)),
        ("percent-encoded-path", http_bytes("POST", "/v2/%72epository/index", b"{}"), (400,)),
        ("get-with-body", http_bytes("GET", "/v2/health/ready", good), (200, 400)),
        ("wrong-method", http_bytes("DELETE", infer, good), (405,)),
        ("method-unknown", http_bytes("GE5", "/v2/health/ready"), (405,)),
        ("method-junk", http_bytes("POS" + "%" * 300, "/v2/models/esm2/infer", good), (405,)),
        ("head-request", http_bytes("HEAD", "/v2/models/esm2"), (200, 400, 404, 405)),
        ("two-content-lengths", http_bytes("POST", infer, good, [f"Content-Length: {len(good) + 1}"]), (400,)),
        ("length-and-chunked", http_bytes("POST", infer, good, ["Transfer-Encoding: chunked"]), (400,)),
        ("transfer-encoding-gzip", http_bytes("POST", infer, good, ["Transfer-Encoding: gzip"], length=False), (501,)),
        ("content-length-junk", http_bytes("POST", infer, good, ["Content-Length: 12abc"], length=False), (400,)),
        ("content-length-negative", http_bytes("POST", infer, good, ["Content-Length: -1"], length=False), (400,)),
        ("chunk-size-junk", http_bytes("POST", infer, b"zz\r\n", ["Transfer-Encoding: chunked"], length=False), (400,)),
        ("chunk-size-huge", http_bytes("POST", infer, b"ffffffffffffffff\r\n", ["Transfer-Encoding: chunked"],
                                       length=False), (400, 413)),
        ("head-100-kb", http_bytes("GET", "/v2/health/ready", headers=["X-Junk: " + "j" * 100_000]), (431,)),
        ("header-value-9-kb", http_bytes("GET", "/v2/health/ready", headers=["X-J: " + ":" * 9000]), (431,)),
        ("header-name-9-kb", http_bytes("GET", "/v2/health/ready", headers=["X" * 9000 + ": j"]), (431,)),
        ("10000-headers", http_bytes("GET", "/v2/health/ready", headers=["X-J: j"] * 10_000), (431,)),
        ("target-10-kb", http_bytes("GET", "/v2/health/ready?" + "a=b&" * 2500), (414,)),
        ("target-absolute", http_bytes("GET", "http://evil.example/v2/health/ready"), (400,)),
        ("target-non-ascii", http_bytes("GET", "/v2/health/r\u00e9ady"), (400,)),
        ("header-control-char", http_bytes("GET", "/v2/health/ready", headers=["X-A: a\x01b"]), (400,)),
        ("header-no-colon", http_bytes("GET", "/v2/health/ready", headers=["NoColonHere"]), (400,)),
        ("header-space-in-name", http_bytes("GET", "/v2/health/ready", headers=["X A: b"]), (400,)),
        ("request-line-junk", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 200 + b"\r\n\r\n", (400,)),
        ("request-line-too-many-parts", b"GET / / HTTP/1.1\r\n\r\n", (400,)),
        ("http-2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400, 405, 505)),
        ("http-0.9", b"GET /v2/health/ready\r\n\r\n", (400,)),
        ("http-version-junk", b"GET /v2/health/ready HTTP/9.9\r\n\r\n", (505,)),
        ("truncated-body", http_bytes("POST", infer, good, [f"Content-Length: {len(good) + 100}"], length=False),
         (None,)),
        ("empty-connection", b"", (None,)),
    ]


HOSTILE_HTTP = hostile_http_cases()


@pytest.mark.parametrize("case, payload, allowed", HOSTILE_HTTP, ids=[c[0] for c in HOSTILE_HTTP])
def test_hostile_http_request_is_refused_and_the_server_goes_on(embed_server, case, payload, allowed):
    status, raw = exchange(http_port(embed_server.http_url), payload, timeout=60)
    assert status in allowed, (case, raw[:400])
    if status is not None and status >= 400 and not payload.startswith(b"HEAD "):  # HEAD: no body
        # a JSON {"error": ...}, or the same as a server-sent event (generate_stream)
        assert b'"error"' in raw, raw[:400]
    assert_serves(embed_server)


def test_pipelined_and_kept_alive_requests_are_answered_in_order(embed_server):
    port = http_port(embed_server.http_url)
    one = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    two = b"POST /v2/models/esm2/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(infer_body(["MK"]))
    status, raw = exchange(port, one + two + infer_body(["MK"]) + http_bytes("GET", "/v2/models/esm2"))
    assert raw.count(b"HTTP/1.1 200") == 3, raw[:600]


def test_the_front_end_adds_no_delayed_ack_wait(embed_server):
    """An answer goes out in two writes (head, body): without TCP_NODELAY on the accepted
    socket each kept-alive request waited ~40 ms for the client's delayed ACK."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", http_port(embed_server.http_url), timeout=30)
    try:
        times = []
        for _ in range(20):
            started = time.perf_counter()
            connection.request("GET", "/v2/models/esm2/config")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
            times.append(time.perf_counter() - started)
    finally:
        connection.close()
    assert min(times) < 0.025, times


def test_many_concurrent_hostile_and_good_requests(embed_server):
    """64 connections at once, good and hostile mixed: every good one answered correctly."""
    port = http_port(embed_server.http_url)
    good = http_bytes("POST", "/v2/models/esm2/infer", infer_body([GOOD["esm2"], "MKV"]))
    hostile = [c[1] for c in HOSTILE_HTTP if c[0] in (
        "json-nested-2M", "json-truncated", "json-shape-overflow", "head-100-kb", "request-line-junk", "truncated-body")]
    payloads = [good if i % 2 else hostile[i // 2 % len(hostile)] for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: exchange(port, p), payloads))
    for i, (status, raw) in enumerate(answers):
        if i % 2:
            assert status == 200, raw[:300]
            assert answer_json(raw)["outputs"][0]["shape"] == [2, embed_server.hidden_sizes["esm2"]]
        else:
            assert status != 502, raw[:300]
    assert_serves(embed_server)


def test_slow_and_idle_clients_do_not_block_others(embed_server):
    """Connections that send half a head, or nothing, are left open while others are served."""
    port = http_port(embed_server.http_url)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    try:
        for sock in idle[::2]:
            sock.sendall(b"POST /v2/models/esm2/infer HTTP/1.1\r\nContent-Length: 100\r\n")
        assert_serves(embed_server)
    finally:
        for sock in idle:
            sock.close()
    assert_serves(embed_server)


# ------------------------------------------------------------------ hostile gRPC


def grpc_infer_raw(grpc_url, request, timeout=60):
    """A ModelInferRequest sent as built, bypassing tritonclient's checks."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(grpc_url, options=[("grpc.max_send_message_length", -1),
                                                       ("grpc.max_receive_message_length", -1)])
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelInfer(service_pb2.ModelInferRequest(**request), timeout=timeout)
    finally:
        channel.close()


def grpc_tensor(name="SEQUENCE", datatype="BYTES", shape=(1, 1), **kwargs):
    from tritonclient.grpc import service_pb2

    return service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype=datatype, shape=list(shape), **kwargs)


def hostile_grpc_cases():
    from tritonclient.grpc import service_pb2

    contents = service_pb2.InferTensorContents
    big = 64 << 20
    return [
        ("sequence-64-MB", dict(model_name="esm2", inputs=[grpc_tensor()],
                                raw_input_contents=[struct.pack("<I", big) + b"M" * big])),
        ("bytes-length-lies", dict(model_name="esm2", inputs=[grpc_tensor()],
                                   raw_input_contents=[struct.pack("<I", 2 ** 31) + b"MK"])),
        ("bytes-length-truncated", dict(model_name="esm2", inputs=[grpc_tensor()], raw_input_contents=[b"\x05\x00"])),
        ("shape-negative", dict(model_name="esm2", inputs=[grpc_tensor(shape=(-5, 1))],
                                raw_input_contents=[struct.pack("<I", 2) + b"MK"])),
        ("shape-10000-dims", dict(model_name="esm2", inputs=[grpc_tensor(shape=[1] * 10_000)],
                                  raw_input_contents=[struct.pack("<I", 2) + b"MK"])),
        ("batch-over-max", dict(model_name="esm2", inputs=[grpc_tensor(shape=(5000, 1))],
                                raw_input_contents=[(struct.pack("<I", 2) + b"MK") * 5000])),
        ("contents-and-raw", dict(model_name="esm2", inputs=[grpc_tensor(contents=contents(bytes_contents=[b"MK"]))],
                                  raw_input_contents=[struct.pack("<I", 2) + b"MK"])),
        ("no-inputs", dict(model_name="esm2")),
        ("raw-without-inputs", dict(model_name="esm2", raw_input_contents=[b"x" * 1000])),
        ("wrong-datatype-raw", dict(model_name="esm2", inputs=[grpc_tensor(datatype="FP32")],
                                    raw_input_contents=[b"\x00" * 4])),
        ("datatype-junk", dict(model_name="esm2", inputs=[grpc_tensor(datatype="X" * 10_000)],
                               raw_input_contents=[b"\x00" * 4])),
        ("invalid-utf8", dict(model_name="dnabert_s", inputs=[grpc_tensor()],
                              raw_input_contents=[struct.pack("<I", 4) + b"\xff\xfeAC"])),
        ("1000-inputs", dict(model_name="esm2", inputs=[grpc_tensor(name=f"I{i}") for i in range(1000)],
                             raw_input_contents=[struct.pack("<I", 2) + b"MK"] * 1000)),
        ("unknown-model", dict(model_name="m" * 100_000, inputs=[grpc_tensor()],
                               raw_input_contents=[struct.pack("<I", 2) + b"MK"])),
        ("unknown-output", dict(model_name="esm2", inputs=[grpc_tensor()], raw_input_contents=[
            struct.pack("<I", 2) + b"MK"], outputs=[service_pb2.ModelInferRequest().InferRequestedOutputTensor(
                name="NOPE")])),
        ("shm-input-unregistered", dict(model_name="esm2", inputs=[grpc_tensor(parameters={
            "shared_memory_region": service_pb2.InferParameter(string_param="nope"),
            "shared_memory_byte_size": service_pb2.InferParameter(int64_param=64)})])),
    ]


HOSTILE_GRPC = hostile_grpc_cases() if grpcclient else []


@pytest.mark.parametrize("case, request_fields", HOSTILE_GRPC, ids=[c[0] for c in HOSTILE_GRPC])
def test_hostile_grpc_request_gets_an_error_and_the_server_goes_on(embed_server, case, request_fields):
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        grpc_infer_raw(embed_server.grpc_url, request_fields)
    # RESOURCE_EXHAUSTED: Triton's error echoes a 100 kB name, over gRPC's metadata limit
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED), (case, info.value)
    assert info.value.details(), case
    assert_serves(embed_server)


@pytest.mark.parametrize("rows", [2 ** 62, 2 ** 32 + 1])
def test_a_shape_claiming_more_rows_than_sent_is_answered_for_the_rows_sent(embed_server, rows):
    """Triton 2.51 counts a BYTES tensor's elements in 32 bits: [2**62, 1] or [2**32 + 1, 1]
    with one element passes its checks (and max_batch_size). Nothing breaks and nothing is
    invented: the answer has one row per sequence actually sent."""
    status, raw = exchange(http_port(embed_server.http_url),
                           http_bytes("POST", "/v2/models/esm2/infer", infer_body([GOOD["esm2"]], shape=[rows, 1])))
    assert status in (200, 400), raw[:300]
    if status == 200:
        assert answer_json(raw)["outputs"][0]["shape"] == [1, embed_server.hidden_sizes["esm2"]]
    try:
        answer = grpc_infer_raw(embed_server.grpc_url, dict(model_name="esm2", inputs=[grpc_tensor(shape=(rows, 1))],
                                                            raw_input_contents=[struct.pack("<I", 2) + b"MK"]))
        assert list(answer.outputs[0].shape) == [1, embed_server.hidden_sizes["esm2"]]
    except Exception as err:  # noqa: BLE001 - a refusal is fine too (a later Triton)
        assert "INVALID_ARGUMENT" in str(err), err
    assert_serves(embed_server)


def test_grpc_stream_with_good_bad_and_junk_messages(embed_server):
    """ModelStreamInfer: every message answered (bad ones with an error), junk bytes end the
    stream with an error, and the server goes on."""
    import queue

    import grpc

    answers = queue.Queue()
    client = grpcclient.InferenceServerClient(embed_server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(20):
            tensor = grpcclient.InferInput("SEQUENCE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[b"MKTAYIAKQ" if i % 2 else b"MK#L"]], dtype=object))
            client.async_stream_infer("esm2", [tensor], request_id=str(i))
        got = [answers.get(timeout=60) for _ in range(20)]
        client.stop_stream()
    finally:
        client.close()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 10 and all("'#'" in e.message() for e in errors), errors
    assert all(r.as_numpy("EMBEDDING").shape == (1, embed_server.hidden_sizes["esm2"]) for r, e in got if e is None)
    channel = grpc.insecure_channel(embed_server.grpc_url)
    try:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        rng = random.Random(5)
        messages = [mutate(base, rng) for base in grpc_bases() * 10] + [b"\xff" * 1000]
        try:
            for _ in stream(iter(messages), timeout=60):
                pass
        except grpc.RpcError as err:
            assert err.code() != grpc.StatusCode.UNAVAILABLE, err
    finally:
        channel.close()
    assert_serves(embed_server)


def test_junk_bytes_on_the_grpc_port(embed_server):
    port = http_port("x:" + embed_server.grpc_url.rsplit(":", 1)[1])
    for junk in (b"\x00" * 10_000, b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 5000):
        exchange(port, junk, timeout=10)
    assert_serves(embed_server)


def test_concurrent_grpc_mix_of_good_and_bad(embed_server):
    def one(i):
        sequence = GOOD["esm2"] if i % 3 else "MK#L"
        try:
            return good_grpc(embed_server.grpc_url) if sequence == GOOD["esm2"] else grpc_infer_raw(
                embed_server.grpc_url, dict(model_name="esm2", inputs=[grpc_tensor()],
                                            raw_input_contents=[struct.pack("<I", 4) + b"MK#L"]))
        except Exception as err:  # noqa: BLE001 - returned for the check below
            return err

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(48)))
    for i, answer in enumerate(answers):
        if i % 3:
            assert isinstance(answer, np.ndarray) and answer.shape == (1, embed_server.hidden_sizes["esm2"]), answer
        else:
            assert isinstance(answer, Exception) and "'#'" in str(answer), answer
    assert_serves(embed_server)


# ------------------------------------------------------------------ seeded mutation fuzz

FUZZ_REQUESTS = 300  # per transport; a 5,000-per-transport run is in docs/deploy.md


def http_bases():
    """Valid requests to mutate: JSON, binary tensors, chunked, GETs."""
    body = json.dumps({"inputs": [{"name": "SEQUENCE", "shape": [2, 1], "datatype": "BYTES",
                                   "data": ["MKTAYIAKQ", "MKV"]}]}).encode()
    head = json.dumps({"inputs": [{"name": "SEQUENCE", "shape": [1, 1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 13}}],
                       "outputs": [{"name": "EMBEDDING", "parameters": {"binary_data": True}}]}).encode()
    binary = head + struct.pack("<I", 9) + b"MKTAYIAKQ"

    def req(method, path, body=b"", headers=()):
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    dna = body.replace(b"MKTAYIAKQ", b"ACGTNACGT").replace(b"MKV", b"acg")
    return [
        req("POST", "/v2/models/esm2/infer", body, ["Content-Type: application/json"]),
        req("POST", "/v2/models/dnabert_s/infer", dna),
        req("POST", "/v2/models/esm2/infer", binary, [f"Inference-Header-Content-Length: {len(head)}"]),
        req("GET", "/v2/health/ready"), req("GET", "/v2/models/esm2/config"), req("GET", "/v2/models/dnabert_s/stats"),
        b"POST /v2/models/esm2/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
    ]


JUNK = [b"\x00", b"\xff", b"\r\n", b"\r\n\r\n", b"{", b"[", b'"', b"\\", b":", b" ", b"-1", b"99999999999999999999",
        b"\xc3\x28", b"%", b"\t", b"1e999", b"null", b",", b"]}", b"\x16\x03\x01"]


def mutate(data, rng):
    """1-6 random edits: flip a byte, insert junk (up to 10,000 times), delete, truncate,
    repeat a span, change a number or a Content-Length."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        i = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(i, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[i:i] = rng.choice(JUNK) * rng.choice((1, 1, 2, 100, 10_000))
        elif op == 2 and data:
            del data[i:i + rng.randint(1, 20)]
        elif op == 3:
            del data[i:]
        elif op == 4 and data:
            j = rng.randrange(len(data))
            data[i:i] = data[j:j + rng.randint(1, 200)] * rng.choice((1, 2, 50))
        elif op == 5:
            number = rng.choice((0, -1, 2 ** 31, 2 ** 32 + 1, 2 ** 63, 10 ** 30))
            data = bytearray(bytes(data).replace(b"1", str(number).encode(), 1))
        else:
            digit = str(rng.randrange(10)).encode()
            data = bytearray(bytes(data).replace(b"Content-Length: ", b"Content-Length: " + digit, 1))
    return bytes(data)


def grpc_bases():
    """Serialized ModelInferRequests (raw and typed contents) for both models."""
    from tritonclient.grpc import service_pb2

    tensor = service_pb2.ModelInferRequest().InferInputTensor
    out = []
    for model, seqs in (("esm2", [b"MKTAYIAKQ", b"MKV"]), ("dnabert_s", [b"ACGTNACGT", b"acg"])):
        raw = b"".join(struct.pack("<I", len(s)) + s for s in seqs)
        out.append(service_pb2.ModelInferRequest(
            model_name=model, inputs=[tensor(name="SEQUENCE", datatype="BYTES", shape=[2, 1])],
            raw_input_contents=[raw]).SerializeToString())
        out.append(service_pb2.ModelInferRequest(model_name=model, inputs=[tensor(
            name="SEQUENCE", datatype="BYTES", shape=[2, 1],
            contents=service_pb2.InferTensorContents(bytes_contents=seqs))]).SerializeToString())
    return out


def test_seeded_fuzz_of_http_requests(embed_server):
    """Valid requests (JSON, binary tensors, chunked, GETs) with bytes flipped, junk inserted,
    spans deleted or repeated, numbers and lengths changed: tritonserver never drops a
    connection (502) and still serves."""
    rng = random.Random(14)
    bases = http_bases()
    port = http_port(embed_server.http_url)
    for i in range(FUZZ_REQUESTS):
        payload = mutate(rng.choice(bases), rng)
        status, raw = exchange(port, payload, timeout=30)
        assert status != 502, (i, payload[:300], raw[:300])
        if i % 100 == 99:
            assert_serves(embed_server)
    assert_serves(embed_server)


def test_seeded_fuzz_of_grpc_messages(embed_server):
    """Serialized ModelInferRequests mutated the same way, sent as raw bytes."""
    import grpc

    rng = random.Random(14)
    bases = grpc_bases()
    channel = grpc.insecure_channel(embed_server.grpc_url)
    try:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for i in range(FUZZ_REQUESTS):
            try:
                call(mutate(rng.choice(bases), rng), timeout=30)
            except grpc.RpcError as err:
                assert err.code() != grpc.StatusCode.UNAVAILABLE, (i, err)
            if i % 100 == 99:
                assert_serves(embed_server)
    finally:
        channel.close()
    assert_serves(embed_server)


# ------------------------------------------------------------------ admin APIs closed by default


def test_admin_apis_are_refused_over_http(embed_server):
    port = http_port(embed_server.http_url)
    register = json.dumps({"key": "/" + "embed_server_x", "offset": 0, "byte_size": 1 << 20}).encode()
    cases = [
        ("POST", "/v2/systemsharedmemory/region/evil/register", register),
        ("GET", "/v2/systemsharedmemory/status", b""),
        ("POST", "/v2/cudasharedmemory/region/evil/register", b'{"raw_handle":{"b64":"AAAA"},"device_id":0,"byte_size":8}'),
        ("POST", "/v2/logging", b'{"log_verbose_level": 3}'),
        ("GET", "/v2/logging", b""),
        ("POST", "/v2/trace/setting", b'{"trace_level":["TIMESTAMPS"]}'),
        ("POST", "/v2/models/esm2/trace/setting", b'{"trace_level":["TIMESTAMPS"]}'),
        ("POST", "/v2/repository/index", b"{}"),
        ("POST", "/v2/repository/models/esm2/unload", b"{}"),
        ("POST", "/v2/repository/models/esm2/load", b"{}"),
    ]
    for method, path, body in cases:
        for headers in ([], [f"admin-key: {ADMIN_KEY}"], ["X-Admin-Disabled: x"]):
            status, raw = exchange(port, http_bytes(method, path, body, headers))
            assert status == 403, (path, headers, raw[:300])
            assert "disabled" in answer_json(raw)["error"], raw[:300]
    assert_serves(embed_server)
    for model in ("esm2", "dnabert_s"):  # nothing was unloaded
        with urllib.request.urlopen(f"{embed_server.http_url}/v2/models/{model}/ready", timeout=10) as response:
            assert response.status == 200


def test_admin_apis_are_refused_over_grpc(embed_server):
    client = grpcclient.InferenceServerClient(embed_server.grpc_url)
    try:
        calls = {
            "register system shm": lambda h: client.register_system_shared_memory(
                "evil", "/embed_server_x", 1 << 20, headers=h),
            "system shm status": lambda h: client.get_system_shared_memory_status(headers=h),
            "register cuda shm": lambda h: client.register_cuda_shared_memory("evil", b"\x00" * 64, 0, 8, headers=h),
            "log settings": lambda h: client.get_log_settings(headers=h),
            "update log settings": lambda h: client.update_log_settings({"log_verbose_level": 3}, headers=h),
            "trace settings": lambda h: client.update_trace_settings(settings={"trace_rate": "1"}, headers=h),
            "repository index": lambda h: client.get_model_repository_index(headers=h),
            "unload": lambda h: client.unload_model("esm2", headers=h),
        }
        for name, call in calls.items():
            for headers in (None, {"triton-grpc-protocol-admin-key": ADMIN_KEY}, {"admin-key": ADMIN_KEY}):
                with pytest.raises(InferenceServerException) as info:
                    call(headers)
                assert "restricted" in info.value.message(), (name, info.value.message())
        # open: health, metadata, config, statistics
        assert client.is_server_ready() and client.is_model_ready("esm2")
        assert client.get_model_metadata("esm2").name == "esm2"
        assert client.get_model_config("esm2").config.name == "esm2"
        assert client.get_inference_statistics("esm2").model_stats
    finally:
        client.close()
    assert_serves(embed_server)


# ------------------------------------------------------------------ TLS and keys


def self_signed(tmp_path):
    """(certificate, key) for 127.0.0.1 and localhost, valid for a day."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import datetime
        import ipaddress
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is available")
        return certificates.self_signed(tmp_path)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def secured(tmp_path_factory, demo_checkpoints, start_embed_server):
    """A second embed-server (dnabert_s, one CPU instance) with TLS, an admin key and an API key."""
    from embed_server.repository import assemble_repository

    root = tmp_path_factory.mktemp("secured")
    cert, key = self_signed(root)
    repo = assemble_repository(root / "repo", {"dnabert_s": demo_checkpoints / "dnabert_s"}, cpu_instances=1)
    log = root / "tritonserver.log"
    with start_embed_server(repo, "the secured embed-server", log_file=log, tls_cert=cert, tls_key=key,
                            admin_key=ADMIN_KEY, api_key=API_KEY, max_request_bytes=1 << 20) as server:
        yield server, cert, log


def tls_client(server, cert, **options):
    return dict(url=server.grpc_url, ssl=True, root_certificates=str(cert), **options)


API = {"triton-grpc-protocol-x-api-key": API_KEY}


def test_grpc_over_tls_with_the_api_key(secured):
    server, cert, _ = secured
    got = good_grpc(server.grpc_url, "dnabert_s", headers=API, ssl=True, root_certificates=str(cert))
    assert got.shape[0] == 1
    for headers in (None, {"triton-grpc-protocol-x-api-key": "wrong-" + API_KEY}, {"x-api-key": API_KEY}):
        with pytest.raises(InferenceServerException) as info:
            good_grpc(server.grpc_url, "dnabert_s", headers=headers, ssl=True, root_certificates=str(cert))
        assert "restricted" in info.value.message()
    # health and metadata stay open without the key
    client = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(cert))
    try:
        assert client.is_server_ready() and client.get_model_metadata("dnabert_s").name == "dnabert_s"
    finally:
        client.close()


def test_plain_grpc_is_refused_when_tls_is_on(secured):
    server, cert, _ = secured
    assert_plain_grpc_refused_tls_served(server.grpc_url, ssl=True, root_certificates=str(cert))


def assert_plain_grpc_refused_tls_served(url: str, **tls) -> None:
    """Plaintext gRPC to a TLS port is refused; the same call over TLS with the API key is served."""
    client = grpcclient.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException):
            client.is_server_live(client_timeout=10)
    finally:
        client.close()
    assert good_grpc(url, "dnabert_s", headers=API, **tls).shape[0] == 1


def test_https_with_the_api_key_and_plain_http_refused(secured):
    server, cert, _ = secured
    assert server.http_url.startswith("https://")
    context = ssl.create_default_context(cafile=str(cert))
    for header in ("x-api-key", "triton-grpc-protocol-x-api-key"):
        assert good_http(server.http_url, "dnabert_s", headers={header: API_KEY}, context=context)["shape"][0] == 1
    for headers in ({}, {"x-api-key": "wrong-" + API_KEY}, {"x-api-key": API_KEY.upper()}):
        with pytest.raises(urllib.error.HTTPError) as info:
            good_http(server.http_url, "dnabert_s", headers=headers, context=context)
        assert info.value.code == 401 and "x-api-key" in json.loads(info.value.read())["error"]
    with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=10, context=context) as response:
        assert response.status == 200  # open without a key
    # plain HTTP to the HTTPS port: no answer, the server goes on
    status, _ = exchange(int(server.http_url.rsplit(":", 1)[1]), http_bytes("GET", "/v2/health/ready"), timeout=15)
    assert status is None
    # TLS junk and an abandoned handshake
    port = int(server.http_url.rsplit(":", 1)[1])
    exchange(port, b"\x16\x03\x01\x00\x05hello" + b"\x00" * 1000, timeout=15)
    # its (smaller) size limit, over TLS
    status, raw = exchange(port, http_bytes("POST", "/v2/models/dnabert_s/infer", b" " * (2 << 20),
                                            [f"x-api-key: {API_KEY}"]), context=context)
    assert status == 413 and "1,048,576" in answer_json(raw)["error"]
    assert good_http(server.http_url, "dnabert_s", headers={"x-api-key": API_KEY}, context=context)["shape"][0] == 1


def test_admin_apis_with_the_admin_key(secured):
    server, cert, _ = secured
    context = ssl.create_default_context(cafile=str(cert))
    request = urllib.request.Request(f"{server.http_url}/v2/logging", headers={"admin-key": ADMIN_KEY})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        assert "log_verbose_level" in json.loads(response.read())
    for headers in ({}, {"admin-key": API_KEY}, {"admin-key": ADMIN_KEY + "x"}):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(f"{server.http_url}/v2/systemsharedmemory/status",
                                                          headers=headers), timeout=10, context=context)
        assert info.value.code == 403 and "admin-key" in json.loads(info.value.read())["error"]
    client = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(cert))
    try:
        admin = {"triton-grpc-protocol-admin-key": ADMIN_KEY}
        assert "log_verbose_level" in str(client.get_log_settings(headers=admin))
        assert client.get_system_shared_memory_status(headers=admin) is not None
        for headers in (None, API, {"triton-grpc-protocol-admin-key": API_KEY}):
            with pytest.raises(InferenceServerException) as info:
                client.get_system_shared_memory_status(headers=headers)
            assert "restricted" in info.value.message()
    finally:
        client.close()


def test_keys_are_not_in_the_log_or_the_printed_endpoints(secured):
    server, _, log = secured
    text = log.read_text(errors="replace") + server.endpoints() + repr(server.options)
    assert ADMIN_KEY not in text and API_KEY not in text


# ------------------------------------------------------------------ unit checks (no server)


def test_routes_are_classified_as_triton_routes_them():
    expected = {
        "/v2/health/live": "health", "/v2/health/ready": "health", "/v2": "metadata",
        "/v2/models/esm2": "metadata", "/v2/models/esm2/versions/1": "metadata",
        "/v2/models/esm2/ready": "health", "/v2/models/esm2/infer": "inference",
        "/v2/models/esm2/versions/1/infer": "inference", "/v2/models/esm2/generate_stream": "inference",
        "/v2/models/esm2/config": "model-config", "/v2/models/esm2/stats": "statistics",
        "/v2/models/stats": "statistics", "/v2/models/esm2/trace/setting": "trace", "/v2/trace/setting": "trace",
        "/v2/logging": "logging", "/v2/repository/index": "model-repository",
        "/v2/repository/models/esm2/load": "model-repository", "/v2/repository/x/models/esm2/unload": "model-repository",
        "/v2/systemsharedmemory/status": "shared-memory", "/v2/systemsharedmemory/region/r/register": "shared-memory",
        "/v2/cudasharedmemory/region/r/unregister": "shared-memory",
        "/v2/": None, "/v2//repository/index": None, "/v2/models/esm2/infer/": None, "/metrics": None, "/": None,
        "/v2/models/esm2/versions/x/infer": None, "/v2/repository/../logging": None,
    }
    assert {path: classify(path) for path in expected} == expected


def test_json_depth_check():
    assert not json_too_deep(infer_body([GOOD["esm2"]] * 1000))
    assert not json_too_deep(b'{"inputs":[{"data":[[["a"],["b"]],[["c"],["d"]]]}]}')
    assert not json_too_deep(b'{"s": "' + b"[" * 10_000 + b'"}')  # brackets in strings do not count
    assert not json_too_deep(b'{"s": "\\"' + b"[" * 10_000 + b'"}')
    assert not json_too_deep(deep(MAX_JSON_DEPTH))
    assert json_too_deep(deep(MAX_JSON_DEPTH + 1))
    assert json_too_deep(b"[[]" * (MAX_JSON_DEPTH + 1))
    assert json_too_deep(b"{" * 1000)
    assert json_too_deep(b"]" * 100 + b"[" * 100)


def test_options_are_checked_and_keys_never_shown(tmp_path):
    for key in ("short", "has space in it, long enough", "x" * 300, "colon:inside-a-long-key"):
        with pytest.raises(LaunchError) as info:
            ServerOptions(model_repository=tmp_path, admin_key=key)
        assert key not in str(info.value)
    with pytest.raises(LaunchError, match="differ"):
        ServerOptions(model_repository=tmp_path, admin_key=ADMIN_KEY, api_key=ADMIN_KEY)
    assert ADMIN_KEY not in repr(ServerOptions(model_repository=tmp_path, admin_key=ADMIN_KEY, api_key=API_KEY))
    with pytest.raises(LaunchError, match="both"):
        ServerOptions(model_repository=tmp_path, tls_cert=tmp_path)
    for arg in ("--http-address=0.0.0.0", "--grpc-restricted-protocol=inference:a=b", "--allow-http=true",
                "--model-control-mode=explicit", "oops"):
        with pytest.raises(LaunchError):
            ServerOptions(model_repository=tmp_path, triton_args=(arg,))
    ServerOptions(model_repository=tmp_path, triton_args=("--model-load-thread-count=8",))


def test_cli_reads_keys_from_files_and_environment(tmp_path, monkeypatch, capsys):
    from embed_server.cli import read_key

    path = tmp_path / "key"
    path.write_text(ADMIN_KEY + "\n")
    path.chmod(0o600)
    assert read_key(path, "EMBED_ADMIN_KEY", "admin key") == ADMIN_KEY
    path.chmod(0o644)
    assert read_key(path, "EMBED_ADMIN_KEY", "admin key") == ADMIN_KEY
    assert "readable by other users" in capsys.readouterr().err
    monkeypatch.setenv("EMBED_API_KEY", API_KEY)
    assert read_key(None, "EMBED_API_KEY", "API key") == API_KEY
    monkeypatch.delenv("EMBED_API_KEY")
    assert read_key(None, "EMBED_API_KEY", "API key") is None
    with pytest.raises(LaunchError):
        read_key(tmp_path / "missing", "EMBED_API_KEY", "API key")
    assert ADMIN_KEY not in capsys.readouterr().err


def test_tritonserver_command_restricts_admin_apis_and_carries_tls(tmp_path):
    from pathlib import Path

    from embed_server.launcher import TritonServer

    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    plain = TritonServer(ServerOptions(model_repository=tmp_path, cpu=True))
    plain._workdir = tmp_path
    command = plain.command(Path("tritonserver"), tmp_path)
    assert f"--http-address=unix:{tmp_path / 'triton-http.sock'}" in command
    (grpc_admin,) = [a for a in command if a.startswith("--grpc-restricted-protocol=")]
    assert grpc_admin.startswith("--grpc-restricted-protocol=shared-memory,model-repository,logging,trace:X-Admin-Disabled=")
    assert not [a for a in command if "ssl" in a or "inference:" in a]
    keyed = TritonServer(ServerOptions(
        model_repository=tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem",
        tls_client_ca=tmp_path / "ca.pem", admin_key=ADMIN_KEY, api_key=API_KEY,
        triton_args=("--exit-timeout-secs=60", "--backend-config=python,shm-default-byte-size=1048576")))
    keyed._workdir = tmp_path
    command = keyed.command(Path("tritonserver"), tmp_path)
    assert f"--grpc-restricted-protocol=shared-memory,model-repository,logging,trace:admin-key={ADMIN_KEY}" in command
    assert f"--grpc-restricted-protocol=inference:x-api-key={API_KEY}" in command
    assert "--grpc-use-ssl-mutual=true" in command and f"--grpc-root-cert={tmp_path / 'ca.pem'}" in command
    assert f"--grpc-server-cert={tmp_path / 'c.pem'}" in command and f"--grpc-server-key={tmp_path / 'k.pem'}" in command
    # --triton-arg replaces embed-server's default of the same option, once
    assert [a for a in command if a.startswith("--exit-timeout-secs")] == ["--exit-timeout-secs=60"]
    assert [a for a in command if "shm-default-byte-size" in a] == ["--backend-config=python,shm-default-byte-size=1048576"]
    assert [a for a in command if "shm-growth-byte-size" in a]  # the other default stays


def test_connections_over_the_cap_get_503_and_others_are_served_after(tmp_path):
    from embed_server.frontend import Frontend, FrontendOptions
    from embed_server.launcher import free_ports

    with unix_backend(tmp_path) as path:
        port = free_ports(1)[0]
        front = Frontend(FrontendOptions(host="127.0.0.1", port=port, backend_socket=path, max_connections=5)).start()
        try:
            held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
            try:
                time.sleep(0.5)
                status, raw = exchange(port, http_bytes("GET", "/v2/health/ready"))
                assert status == 503 and b"too many open connections" in raw, raw
            finally:
                for sock in held:
                    sock.close()
            deadline = time.monotonic() + 10
            while (status := exchange(port, http_bytes("GET", "/v2/health/ready"))[0]) != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert status == 200
        finally:
            front.stop()


def test_front_end_retries_once_when_a_kept_alive_backend_connection_was_closed(tmp_path):
    """The backend answers one request per connection but says keep-alive (as a tritonserver
    that closed an idle connection would look): the next request is sent again on a new
    connection, not answered 502."""
    from embed_server.frontend import Frontend, FrontendOptions
    from embed_server.launcher import free_ports

    served = []
    with unix_backend(tmp_path, say_close=False, served=served) as path:
        port = free_ports(1)[0]
        front = Frontend(FrontendOptions(host="127.0.0.1", port=port, backend_socket=path)).start()
        try:
            one = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
            status, raw = exchange(port, one + one + http_bytes("GET", "/v2/health/ready"))
            assert raw.count(b"HTTP/1.1 200 OK") == 3 and b"502" not in raw, raw
            assert len(served) == 3
        finally:
            front.stop()


def test_https_front_end_with_client_certificates(tmp_path):
    """--tls-client-ca: the HTTPS front end refuses clients without a certificate signed by that
    CA (gRPC's mutual TLS is tritonserver's own, its flags are checked above)."""
    from embed_server.frontend import Frontend, FrontendOptions
    from embed_server.launcher import free_ports

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a CA and a client certificate")
    files = certificates.signed_certificates(tmp_path)

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files["server.crt"], files["server.key"])
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(files["ca.crt"])
    with unix_backend(tmp_path) as path:
        port = free_ports(1)[0]
        front = Frontend(FrontendOptions(host="127.0.0.1", port=port, backend_socket=path,
                                         ssl_context=server_context)).start()
        try:
            client = ssl.create_default_context(cafile=str(files["ca.crt"]))
            status, raw = exchange(port, http_bytes("GET", "/v2/health/ready"), timeout=15, context=client)
            assert status is None, raw  # no client certificate: the handshake fails
            client.load_cert_chain(files["client.crt"], files["client.key"])
            status, raw = exchange(port, http_bytes("GET", "/v2/health/ready"), timeout=15, context=client)
            assert status == 200, raw
            stranger = ssl.create_default_context(cafile=str(files["ca.crt"]))
            stranger.load_cert_chain(*certificates.self_signed(tmp_path, "other", "/CN=stranger", alt_names=None))
            status, raw = exchange(port, http_bytes("GET", "/v2/health/ready"), timeout=15, context=stranger)
            assert status is None, raw  # a certificate the CA did not sign
        finally:
            front.stop()


# ------------------------------------------------------------------ the optional gRPC proxy


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, demo_checkpoints, start_embed_server):
    """embed-server --grpc-max-request-bytes 1 MiB, with TLS (ending at the proxy) and an API key."""
    from embed_server.repository import assemble_repository

    pytest.importorskip("grpc")
    root = tmp_path_factory.mktemp("proxied")
    cert, key = self_signed(root)
    repo = assemble_repository(root / "repo", {"dnabert_s": demo_checkpoints / "dnabert_s"}, cpu_instances=1)
    with start_embed_server(repo, "the proxied embed-server", log_file=root / "tritonserver.log", tls_cert=cert,
                            tls_key=key, api_key=API_KEY, grpc_max_request_bytes=1 << 20) as server:
        yield server, cert


def test_grpc_proxy_refuses_messages_over_its_limit_and_relays_the_rest(proxied):
    import grpc

    server, cert = proxied
    tls = dict(ssl=True, root_certificates=str(cert))
    assert good_grpc(server.grpc_url, "dnabert_s", headers=API, **tls).shape[0] == 1
    client = grpcclient.InferenceServerClient(server.grpc_url, **tls)
    try:
        big = grpcclient.InferInput("SEQUENCE", [1, 1], "BYTES")
        big.set_data_from_numpy(np.array([[b"A" * (2 << 20)]], dtype=object))
        with pytest.raises(InferenceServerException) as info:
            client.infer("dnabert_s", [big], headers=API)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "1048576" in info.value.message()
        just_under = grpcclient.InferInput("SEQUENCE", [1, 1], "BYTES")
        just_under.set_data_from_numpy(np.array([[b"A" * 900_000]], dtype=object))
        with pytest.raises(InferenceServerException) as info:  # relayed: the model's own refusal
            client.infer("dnabert_s", [just_under], headers=API)
        assert "10000" in info.value.message()
        for headers in (None, {"triton-grpc-protocol-x-api-key": "wrong-" + API_KEY}):  # keys still checked
            with pytest.raises(InferenceServerException) as info:
                good_grpc(server.grpc_url, "dnabert_s", headers=headers, **tls)
            assert "restricted" in info.value.message()
        with pytest.raises(InferenceServerException) as info:  # admin APIs still closed
            client.get_log_settings()
        assert "restricted" in info.value.message()
        assert client.is_server_ready() and client.get_model_metadata("dnabert_s").name == "dnabert_s"
        # a deadline reaches tritonserver through the proxy
        with pytest.raises(InferenceServerException) as info:
            tensor = grpcclient.InferInput("SEQUENCE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[b"ACGT"]], dtype=object))
            client.infer("dnabert_s", [tensor], headers=API, client_timeout=1e-6)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        client.close()
    # the stream is relayed too
    channel = grpc.secure_channel(server.grpc_url, grpc.ssl_channel_credentials(cert.read_bytes()))
    try:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        from tritonclient.grpc import service_pb2

        answers = [service_pb2.ModelStreamInferResponse.FromString(raw)
                   for raw in stream(iter(grpc_bases()[2:4]), metadata=tuple(API.items()), timeout=60)]
        assert len(answers) == 2 and not [a.error_message for a in answers if a.error_message], answers
        assert [list(a.infer_response.outputs[0].shape)[0] for a in answers] == [2, 2]
    finally:
        channel.close()
    # plain gRPC to the TLS proxy: refused
    assert_plain_grpc_refused_tls_served(server.grpc_url, **tls)


def test_tritonserver_command_with_the_grpc_proxy(tmp_path):
    from pathlib import Path

    from embed_server.launcher import TritonServer

    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    server = TritonServer(ServerOptions(model_repository=tmp_path, tls_cert=tmp_path / "c.pem",
                                        tls_key=tmp_path / "k.pem", grpc_max_request_bytes=1 << 20))
    server._workdir = tmp_path
    command = server.command(Path("tritonserver"), tmp_path)
    assert f"--grpc-address=unix:{tmp_path / 'triton-grpc.sock'}" in command
    assert not [a for a in command if "ssl" in a or "server-cert" in a]  # TLS ends at the proxy
    with pytest.raises(LaunchError):
        ServerOptions(model_repository=tmp_path, grpc_max_request_bytes=10)
