#!/usr/bin/env python3
"""A tiny OpenAI-compatible upstream for the README's "Run it behind Envoy" walkthrough.

Standard library only. POST /v1/chat/completions answers like OpenAI: a JSON completion, or
with "stream": true a server-sent-events stream whose last chunk carries the `usage` block
(what Envoy's Lua filter reads). Token counts come from --prompt-tokens/--completion-tokens.
GET /healthz answers "ok". (The tests use a fuller mock written in Rust:
server/tests/common/mock_openai.rs.)

    python3 examples/envoy/mock_upstream.py --port 8000
"""

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY_BYTES = 1 << 20


def handler(prompt_tokens: int, completion_tokens: int, chunk_delay_s: float):
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self.reply(200, {"status": "ok"})
            else:
                self.reply(404, {"error": {"message": "not found", "type": "invalid_request_error", "code": "not_found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if self.path != "/v1/chat/completions" or length > MAX_BODY_BYTES:
                self.reply(404, {"error": {"message": "not found", "type": "invalid_request_error", "code": "not_found"}})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self.reply(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error", "code": "bad_json"}})
                return
            model = body.get("model", "unknown")
            if not body.get("stream"):
                self.reply(200, {
                    "id": "chatcmpl-demo", "object": "chat.completion", "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
                    "usage": usage,
                })
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()

            def event(payload: str) -> None:
                data = f"data: {payload}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            for word in ["Hel", "lo", "!"]:
                event(json.dumps({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                                  "choices": [{"index": 0, "delta": {"content": word}}]}))
                time.sleep(chunk_delay_s)
            event(json.dumps({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                              "choices": [], "usage": usage}))
            event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, fmt, *args) -> None:
            pass

    return Handler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000)")
    p.add_argument("--prompt-tokens", type=int, default=12, help="usage.prompt_tokens of every reply")
    p.add_argument("--completion-tokens", type=int, default=30, help="usage.completion_tokens of every reply")
    p.add_argument("--chunk-delay-ms", type=int, default=100, help="pause between stream chunks")
    a = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", a.port),
                                 handler(a.prompt_tokens, a.completion_tokens, a.chunk_delay_ms / 1000))
    print(f"mock OpenAI upstream on http://127.0.0.1:{a.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
