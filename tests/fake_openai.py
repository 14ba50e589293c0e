"""A small fake OpenAI-compatible streaming server on loopback for the `openai` engine's
tests (tests/test_openai.py); run as a script (`--port N`), it stands in for vLLM's server."""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKENS = 5  # the fake server's answer: one token a chunk


class FakeServer(ThreadingHTTPServer):
    """Answers each completion request by the next of `modes` (cycled); counts drafts in its
    /metrics as vLLM does (3 drafts of 2 tokens, 4 accepted, per answered request)."""

    daemon_threads = True

    def __init__(self, modes, port: int = 0):
        super().__init__(("127.0.0.1", port), FakeHandler)
        self.modes, self.requests, self.answered, self.bodies = list(modes), 0, 0, []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        pass  # a client that gave up (a timeout under test) leaves a broken pipe here

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        if self.path == "/health":
            return self._plain(200, "")
        if self.path != "/metrics":
            return self._plain(404, "not found")
        n = server.answered
        self._plain(200, "# TYPE vllm:spec_decode_num_drafts counter\n"
                         f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="m"}} {3.0 * n}\n'
                         f'vllm:spec_decode_num_draft_tokens_total{{engine="0",model_name="m"}} {6.0 * n}\n'
                         f'vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} {4.0 * n}\n'
                         f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="m",position="0"}} {3.0 * n}\n'
                         f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="m",position="1"}} {1.0 * n}\n')

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            mode = server.modes[server.requests % len(server.modes)]
            server.requests += 1
            server.bodies.append(body | {"authorization": self.headers.get("Authorization")})
        if mode.startswith("http"):
            return self._plain(int(mode[4:]), "bad request" if mode == "http400" else "engine died")
        if mode == "slow-first":
            time.sleep(1.5)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(TOKENS):
            if mode == "cut" and i == 2:
                self.close_connection = True
                return
            if mode == "malformed" and i == 2:
                self._event("{not json")
                continue
            if mode == "stall" and i == 1:
                time.sleep(1.5)
            choice = {"index": 0, "text": f" w{i}", "finish_reason": "length" if i == TOKENS - 1 else None}
            if mode != "no-ids":
                choice["token_ids"] = [100 + i]
            chunk = {"choices": [choice]}
            if mode == "llama.cpp" and i == TOKENS - 1:
                chunk["timings"] = {"draft_n": 8, "draft_n_accepted": 3}
            self._event(json.dumps(chunk))
            time.sleep(0.01)
        self._event(json.dumps({"choices": [], "usage": {"completion_tokens": TOKENS}}))
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        with server.lock:
            server.answered += 1

    def _event(self, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def _plain(self, status: int, text: str) -> None:
        payload = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


if __name__ == "__main__":  # as `python -m vllm.entrypoints.openai.api_server ... --port N` would
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    known, _ = parser.parse_known_args()
    print("fake server: starting", flush=True)
    server = FakeServer(["ok"], port=known.port)
    server.serve_forever(poll_interval=0.05)
