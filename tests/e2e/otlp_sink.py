"""A stand-in OpenTelemetry collector: accepts OTLP/HTTP POSTs and appends
each request's path and body size to the file named by argv[2]; prints its
port on stdout once listening (port from argv[1], 0 = any)."""

import http.server
import sys


class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(sys.argv[2], "a") as f:
            f.write(f"{self.path} {len(body)} {self.headers.get('Content-Type')}\n")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
print(server.server_address[1], flush=True)
server.serve_forever()
