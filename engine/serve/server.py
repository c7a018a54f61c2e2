"""Starting the server: Uvicorn on a socket we bind ourselves (so port 0 works and the real
port is known before the first request), in the foreground (dgq-serve) or in a thread (tests,
python -m engine.bench serve)."""
from __future__ import annotations

import socket
import threading

from .protocol import Limits
from .worker import Worker


class ServeError(RuntimeError):
    """The server cannot start: a missing dependency, a port in use."""


def check_deps() -> None:
    """ServeError naming what to install when Starlette or Uvicorn is missing."""
    import importlib.util  # noqa: PLC0415
    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ServeError(f"dgq-serve needs {' and '.join(missing)}: pip install 'dgq-engine[serve]' "
                         f"(or pip install {' '.join(missing)})")


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: {e.strerror}") from None
    family = infos[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(infos[0][4])
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def make_server(lm, host: str = "127.0.0.1", port: int = 8000, model_id: str | None = None,
                max_batch: int = 32, context: int | None = None, kv8: bool = False, chunk: int = 32,
                limits: Limits | None = None, log_level: str = "warning", warm_up: bool = True):
    """(uvicorn.Server, bound socket, url) for a LoadedModel; run with server.run(sockets=[sock])."""
    check_deps()
    import uvicorn  # noqa: PLC0415
    from .app import create_app  # noqa: PLC0415
    limits = limits or Limits()
    worker = Worker(lm, max_batch=max_batch, context=context, kv8=kv8, chunk=chunk, max_queue=limits.max_queue,
                    warm_up=warm_up)
    app = create_app(lm, worker, model_id or default_model_id(lm), limits)
    sock = bind(host, port)
    h, p = sock.getsockname()[:2]
    url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                            h11_max_incomplete_event_size=64 * 1024)
    return uvicorn.Server(config), sock, url


def default_model_id(lm) -> str:
    import os  # noqa: PLC0415
    return os.path.basename(str(lm.source).rstrip("/")) or "dgq"


class ServerThread:
    """The server in a background thread: `with ServerThread(lm) as url: ...`."""

    def __init__(self, lm, **kw):
        kw.setdefault("port", 0)
        self.server, self.sock, self.url = make_server(lm, **kw)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        import time  # noqa: PLC0415
        for _ in range(600):
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.01)
        if not self.server.started:
            raise ServeError("the server did not start")
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
