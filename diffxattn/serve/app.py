"""The live app's HTTP side (Starlette on uvicorn): the page, a small JSON API, progress as Server-Sent Events.

    GET  /                          the page (page.py)
    GET  /api/status?wait=S         {ready, error, samplers, defaults}; waits up to S seconds for the model
    POST /api/runs                  a run (JSON, request.py) -> {run, prompt, steps}; 400 names the bad field
    GET  /api/runs/N/events         the run's events as they happen: queued, running, progress, done | failed | cancelled
    POST /api/runs/N/cancel         stop run N at its next step
    GET  /api/runs/N/FILE           image.png, maps.safetensors, maps.json, command.txt of a finished run

Every request's Host must be one this server answers to (a DNS-rebinding page names its own host) and an
Origin, when sent, must be this server's (403 otherwise): a page elsewhere cannot drive the app. No request
names a file on the server: runs are numbers, files are fixed names of in-memory results.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import sys
import threading

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import message
from .page import CSP, app_page
from .queue import FINAL, RunQueue
from .request import Defaults, FieldError, RunRequest

FILES = ("image.png", "maps.safetensors", "maps.json", "command.txt")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store")]


class LiveApp:
    """The app's state: the pipeline (loaded in a background thread unless given), its defaults, the run queue."""

    def __init__(self, pipeline: str | None = None, *, pipe=None, allowed_hosts: set[str] | None = None):
        self.pipeline, self.pipe = pipeline, pipe
        self.error: str | None = None
        self.defaults: Defaults | None = None
        self.queue: RunQueue | None = None
        self.loaded = threading.Event()
        self.allowed_hosts = allowed_hosts
        routes = [Route("/", self.page), Route("/api/status", self.status),
                  Route("/api/runs", self.submit, methods=["POST"]),
                  Route("/api/runs/{run:int}/events", self.events),
                  Route("/api/runs/{run:int}/cancel", self.cancel, methods=["POST"]),
                  Route("/api/runs/{run:int}/{name:str}", self.download)]
        self.asgi = OriginGuard(Starlette(routes=routes), lambda: self.allowed_hosts)

    # -- the model --
    def start(self) -> LiveApp:
        """Load the model in a background thread (the server answers meanwhile: the page says "loading")."""
        threading.Thread(target=self._load, name="diffxattn-load", daemon=True).start()
        return self

    def _load(self) -> None:
        try:
            if self.pipe is None:
                from ..cli import load_pipeline

                self.pipe = load_pipeline(self.pipeline)
            from ..schedulers import SCHEDULERS, scheduler_name

            self.scheduler_config = dict(self.pipe.scheduler.config)
            config = self.pipe.config
            self.defaults = Defaults(steps=int(config.get("default_steps", 30)),
                                     guidance=float(config.get("default_guidance_scale", 1.0)),
                                     sampler=scheduler_name(self.pipe.scheduler), samplers=tuple(SCHEDULERS))
            self.queue = RunQueue(self._execute)
        except Exception as e:  # told on the page and the terminal; the server keeps answering
            self.error = f"the model did not load: {message(e)}"
            print(f"diffxattn serve: error: {self.error}", file=sys.stderr, flush=True)
        finally:
            self.loaded.set()

    def _execute(self, run):
        from .runs import execute

        return execute(self.pipe, self.scheduler_config, run.request, run, self.pipeline)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()

    # -- routes --
    async def page(self, request: Request) -> Response:
        return HTMLResponse(app_page(), headers={"content-security-policy": CSP})

    async def status(self, request: Request) -> Response:
        try:
            wait = min(max(float(request.query_params.get("wait", 0)), 0), 30)
        except ValueError:
            wait = 0
        if wait:
            await anyio.to_thread.run_sync(self.loaded.wait, wait)
        ready = self.queue is not None
        return JSONResponse({"ready": ready, "error": self.error,
                             "samplers": list(self.defaults.samplers) if ready else [],
                             "defaults": None if not ready else {"steps": self.defaults.steps,
                                                                  "guidance": self.defaults.guidance,
                                                                  "sampler": self.defaults.sampler}})

    async def submit(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "expected a JSON body (Content-Type: application/json)"}, 415)
        if self.queue is None:
            return JSONResponse({"error": self.error or "the model is still loading", "field": None}, 503)
        body = await request.body()
        if len(body) > 100_000:
            return JSONResponse({"error": "request too large"}, 413)
        try:
            run_request = RunRequest.from_json(json.loads(body or b"null"), self.defaults)
            from .runs import resolve_weights

            run_request = await anyio.to_thread.run_sync(resolve_weights, self.pipe, run_request)
        except FieldError as e:
            return JSONResponse({"error": str(e), "field": e.field, "column": e.column, "problem": e.problem}, 400)
        except ValueError as e:  # bad JSON; a word index the prompt does not have
            return JSONResponse({"error": message(e), "field": "weights" if "word" in str(e) else None}, 400)
        run = self.queue.submit(run_request)
        return JSONResponse({"run": run.id, "prompt": run_request.prompt, "steps": run_request.steps})

    def _run(self, request: Request):
        return self.queue.get(request.path_params["run"]) if self.queue is not None else None

    async def events(self, request: Request) -> Response:
        run = self._run(request)
        if run is None:
            return JSONResponse({"error": "no such run (or it is too old)"}, 404)

        async def stream():
            seen = 0
            while True:
                events = await anyio.to_thread.run_sync(run.events_after, seen, 10.0)
                if not events:
                    yield ": still here\n\n"  # keeps proxies and the browser from timing out
                    continue
                seen += len(events)
                for event in events:
                    data = run.result["client"] if event["type"] == "done" else event
                    yield f"event: {event['type']}\ndata: {json.dumps(data, allow_nan=False)}\n\n"
                if events[-1]["type"] in FINAL:
                    return

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def cancel(self, request: Request) -> Response:
        if self.queue is None:
            return JSONResponse({"cancelled": False}, 404)
        return JSONResponse({"cancelled": self.queue.cancel(request.path_params["run"])})

    async def download(self, request: Request) -> Response:
        run, name = self._run(request), request.path_params["name"]
        if name not in FILES or run is None or run.result is None:
            return JSONResponse({"error": "no such file"}, 404)
        content, media_type = run.result["files"][name]
        stem = f"run-{run.id}-{name}"
        return Response(content, media_type=media_type,
                        headers={"content-disposition": f'attachment; filename="{stem}"'})


class OriginGuard:
    """ASGI middleware: 403 unless the Host is one of ours and the Origin (when sent) is this server's."""

    def __init__(self, app, allowed_hosts):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # no websockets here
            if scope["type"] == "lifespan":
                return await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = refuse(headers.get("host", ""), headers.get("origin"), self.allowed_hosts())
        if refusal:
            response = JSONResponse({"error": refusal}, 403)
            return await response(scope, receive, self._secured(send))
        return await self.app(scope, receive, self._secured(send))

    @staticmethod
    def _secured(send):
        async def send_with_headers(event):
            if event["type"] == "http.response.start":
                event = {**event, "headers": [*event.get("headers", []), *SECURITY_HEADERS]}
            await send(event)
        return send_with_headers


def refuse(host: str, origin: str | None, allowed_hosts: set[str] | None) -> str | None:
    """Why a request is refused, or None. `allowed_hosts` None: any Host (a wildcard bind)."""
    host = host.lower()
    if not host or (allowed_hosts is not None and host not in allowed_hosts):
        return f"Host {host!r} is not this server's"
    if origin is not None and origin.lower() != f"http://{host}":
        return f"requests from {origin!r} are refused: only this server's own page may use it"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The Host headers this server answers to: its loopback names (and the bound host), or None for 0.0.0.0/::."""
    if host in ("0.0.0.0", "::", ""):
        return None
    name = f"[{host}]" if ":" in host else host
    return {f"{h}:{port}" for h in (*LOOPBACK_NAMES, name.lower())}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); an address in use is an OSError naming it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror} (choose another --port)") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    return f"http://{f'[{shown}]' if ':' in shown and not shown.startswith('[') else shown}:{port}/"


def _server(live: LiveApp):
    import uvicorn

    config = uvicorn.Config(live.asgi, log_level="warning", lifespan="off", timeout_graceful_shutdown=2,
                            access_log=False)
    return uvicorn.Server(config)


def serve(pipeline: str | None = None, host: str = "127.0.0.1", port: int = 7860) -> None:
    """`diffxattn serve`: bind, print the URL, answer at once while the model loads; Ctrl-C stops it."""
    sock = bind(host, port)
    port = sock.getsockname()[1]
    if not is_loopback(host):
        print(f"diffxattn serve: warning: listening on {host}, not only this machine: anyone who can reach it "
              f"on port {port} can use the app", file=sys.stderr, flush=True)
    live = LiveApp(pipeline, allowed_hosts=allowed_hosts(host, port)).start()
    print(f"diffxattn serve: {url_of(host, port)}  (the model loads in the background; Ctrl-C stops)", flush=True)
    server = _server(live)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the signal for us
        pass
    finally:
        live.close()
        sock.close()
    print("diffxattn serve: stopped", flush=True)


@contextlib.contextmanager
def running(live: LiveApp, host: str = "127.0.0.1", port: int = 0):
    """Serve `live` from a thread (tests, screenshots): yields its URL; stops on exit."""
    sock = bind(host, port)
    port = sock.getsockname()[1]
    live.allowed_hosts = allowed_hosts(host, port)
    if not live.loaded.is_set():
        live.start()
    server = _server(live)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.02)
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
        yield url_of(host, port)
    finally:
        server.should_exit = True
        live.close()
        thread.join(5)
        sock.close()
