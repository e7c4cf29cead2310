"""Run the app with uvicorn: check the address is safe, bind the port ourselves, then serve.

Binding before uvicorn starts turns "port in use" into one clear sentence (and exit status 2)
instead of a log line and a traceback, and leaves no window for another process to take the port
between the check and the bind.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Optional, Union

from langchain_adaptquant.errors import AdaptQuantError
from langchain_adaptquant.server.security import check_bind


class PortUnavailableError(AdaptQuantError):
    """The port is taken (or not ours to bind)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a clear error when the port cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise PortUnavailableError(f"cannot resolve host {host!r}: {error}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # reuse TIME_WAIT, never a live listener
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortUnavailableError(
                f"port {port} on {host} is already in use (another server?); choose another with --port"
            ) from None
        if error.errno == errno.EACCES:
            raise PortUnavailableError(f"not allowed to bind port {port} on {host}; use a port above 1023") from None
        raise PortUnavailableError(f"cannot bind {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    model: Optional[Union[str, Path]] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: Optional[str] = None,
    max_queue: int = 16,
    max_tokens_limit: int = 1024,
    memory_budget_gb: Optional[float] = None,
    preload: bool = True,
    log_level: str = "info",
) -> int:
    """Serve ``model`` until interrupted; returns the process exit status."""
    import uvicorn

    from langchain_adaptquant.runtime.loader import AdaptiveModelLoader, serving_manager
    from langchain_adaptquant.server.app import create_app

    check_bind(host, token)
    manager = serving_manager(memory_budget_gb=memory_budget_gb)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    app = create_app(model, loader=loader, token=token, max_queue=max_queue, max_tokens_limit=max_tokens_limit,
                     preload=preload)
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    served = app.state.ctx.primary
    print(f"adaptquant: serving {served.id} ({served.folder}) on http://{shown}:{bound_port}", flush=True)
    print(f"adaptquant: dashboard http://{shown}:{bound_port}/dashboard, API docs /docs"
          + (", chat and cache/clear need the bearer token" if token else ""), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn shut down gracefully, then re-raised Ctrl-C for the default handler: a normal stop
    finally:
        sock.close()
    if not server.started:
        print("adaptquant: error: the server did not start (see the log above)", flush=True)
        return 1
    print("adaptquant: stopped", flush=True)
    return 0
