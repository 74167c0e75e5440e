"""The sidecar's HTTP/JSON API and web console (`carsvc serve --console-port`),
served with aiohttp on the sidecar's own event loop: docs/console.md.

app.py the server and what guards it, handlers.py the API's endpoints,
sse.py a run's events as Server-Sent Events, errors.py errors as JSON,
jsonio.py messages as JSON, static/ the console's files (no build step)."""

from carsvc.http.app import Console
from carsvc.http.handlers import Api

__all__ = ["Api", "Console"]
