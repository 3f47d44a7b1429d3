"""A small local OpenAI-compatible chat endpoint for the tests: rates an answer by its length."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, fail_first: int = 0, status: int = 429, reply: str | None = None,
                 redirect_to: str | None = None):
        self.requests: list[dict] = []
        self.fail_first = fail_first
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body,
                                        "authorization": self.headers.get("Authorization")})
                if redirect_to is not None:  # a hostile or moved endpoint: "ask over there"
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.end_headers()
                    return
                if len(server.requests) <= server.fail_first:
                    self.send_response(status)
                    self.end_headers()
                    return
                answer = body["messages"][-1]["content"].split("Answer:", 1)[-1]
                content = reply if reply is not None else str(1 + min(9, len(answer.split()) // 3))
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # where urllib would follow a 302 to, with the request's headers
                server.requests.append({"path": self.path, "body": None,
                                        "authorization": self.headers.get("Authorization")})
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                """Quiet: the tests read what was asked from `requests`."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
