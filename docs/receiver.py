"""A receiver for the README's walkthrough: it verifies each delivery's signature.

    python docs/receiver.py PORT TARGET_SECRET [--fail]

Answers 204 to a POST whose Standard Webhooks signature verifies with the
target's secret (and prints ``verified <webhook-id> <body>``), 401 to one that
does not; with ``--fail`` it answers every POST 503, so you see retries and,
once the schedule runs out, a dead letter. Needs ``pip install standardwebhooks``.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main() -> None:
    port, secret = int(sys.argv[1]), sys.argv[2]
    failing = "--fail" in sys.argv[3:]
    webhook = Webhook(secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if failing:
                print(f"failing {self.headers.get('webhook-id')}", flush=True)
                self.send_response(503)
            else:
                try:
                    webhook.verify(body, dict(self.headers.items()))
                except WebhookVerificationError as exc:
                    print(f"refused {self.headers.get('webhook-id')}: {exc}", flush=True)
                    self.send_response(401)
                else:
                    print(f"verified {self.headers['webhook-id']} {body.decode()}", flush=True)
                    self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per delivery is printed above

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
