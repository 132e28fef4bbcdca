"""A local chat-completions endpoint that plays an API judge's server (retries, rate limits, bad bodies,
bad keys), shared by the judge and the evaluation tests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "nvapi-SECRET-do-not-log-1234"


class ChatServer:
    """A chat-completions endpoint on 127.0.0.1 whose behaviour depends on the prompt:

    ``slow``: the first reply comes after 1 s (the client times out at 0.3 s), then fast;
    ``busy``: HTTP 429 (Retry-After: 0) twice, then a reply; ``flaky``: HTTP 503 once;
    ``garbled``: a body that is not JSON once, then a reply without a reward once, then fine;
    ``down``: HTTP 500 always; ``bad``: HTTP 400. The reward is the response's length.
    """

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.auth_seen: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.handle_chat(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def send(self, code: int, payload: bytes, headers: dict[str, str] | None = None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def handle_chat(self, body):
                server.auth_seen.add(self.headers.get("Authorization", ""))
                if self.path != "/v1/chat/completions" or body.get("model") != "nvidia/llama-3.1-nemotron-70b-reward":
                    return self.send(404, b'{"error": "not found"}')
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self.send(401, b'{"error": "bad key"}')
                user, assistant = body["messages"][0]["content"], body["messages"][1]["content"]
                with server.lock:
                    n = server.attempts[user] = server.attempts.get(user, 0) + 1
                time.sleep(0.05)  # long enough for requests to overlap
                ok = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"reward:{len(assistant)}.5"}}]}).encode()
                if "slow" in user and n == 1:
                    time.sleep(1.0)
                    return self.send(200, ok)
                if "busy" in user and n <= 2:
                    return self.send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
                if "flaky" in user and n == 1:
                    return self.send(503, b"unavailable")
                if "garbled" in user and n == 1:
                    return self.send(200, b"<html>oops")
                if "garbled" in user and n == 2:
                    return self.send(200, b'{"choices": [{"message": {"content": "no idea"}}]}')
                if "down" in user:
                    return self.send(500, b"internal error")
                if "bad" in user:
                    return self.send(400, b'{"error": "prompt too long"}')
                return self.send(200, ok)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False
        self.httpd.block_on_close = True  # server_close waits for handlers still sleeping
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
