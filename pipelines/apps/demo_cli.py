"""``guidance-engine demo``: the Gradio demo (needs ``pip install gradio``). Every option is checked
before the model loads; the address is bound once here, so that a bad host or a busy port is a
one-line error naming the option rather than Gradio's "Cannot find empty port"."""

from __future__ import annotations

import argparse
import errno
import os
import socket

from .cli_checks import check_device

#: Gradio's search when no port is given: GRADIO_SERVER_PORT (default 7860) and the next 99 ports.
PORT_TRIES = 100


def _first_port() -> int:
    """Where Gradio starts its search: GRADIO_SERVER_PORT, else 7860."""
    try:
        return int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    except ValueError:
        return 7860


def check_address(host: str, port: int | None) -> int:
    """The port to serve ``host`` on, found by binding it here: ``port`` itself, any free one for 0,
    the first free one of Gradio's range for None. ValueError naming --host or --port otherwise
    (an unknown name, not an address of this machine, a port in use or needing privileges)."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise ValueError(f"--port: must be an integer in [0, 65535] (0: any free port), got {port!r}")
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1], as Gradio takes it
    if not name.strip():
        raise ValueError(f"--host: must be an address or a host name of this machine, got {host!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(name, 0, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(f"--host: cannot bind {host!r}: no such address or host name "
                         f"({getattr(error, 'strerror', None) or error}); "
                         f"e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    start = _first_port()
    for candidate in [port] if port is not None else range(start, start + PORT_TRIES):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                sock.bind((address[0], candidate, *address[2:]))
            except OSError as error:
                if error.errno == errno.EADDRINUSE and port is None:
                    continue
                if error.errno == errno.EADDRINUSE:
                    raise ValueError(f"--port: port {port} on {host} is in use (another server, or another demo); "
                                     f"pass another --port, or --port 0 for any free one") from None
                if error.errno == errno.EACCES:
                    raise ValueError(f"--port: port {candidate} on {host} needs privileges ({error.strerror}); "
                                     f"use a port in [1024, 65535], or --port 0 for any free one") from None
                raise ValueError(f"--host: cannot bind {host!r}: {error.strerror} "
                                 f"(is it an address of this machine?)") from None
            return sock.getsockname()[1]
    raise ValueError(f"--port: every port of {start}-{start + PORT_TRIES - 1} on {host} is in use; "
                     f"pass --port N, or --port 0 for any free one")


def cmd_demo(args: argparse.Namespace) -> int:
    """Check the options (device, concurrency, address: bound once), then load the model and serve."""
    if isinstance(args.concurrency, bool) or not isinstance(args.concurrency, int) or args.concurrency < 1:
        raise ValueError(f"--concurrency: must be an integer >= 1, got {args.concurrency!r}")
    port = check_address(args.host, args.port)
    check_device(args.device)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("demo: gradio is not installed; pip install 'guidance-engine[demo]' or gradio") from None
    from .demo_app import launch

    launch(model=args.model, host=args.host, port=port, concurrency=args.concurrency, device=args.device)
    return 0


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """The ``demo`` subcommand's parser."""
    demo = subparsers.add_parser("demo", help="Gradio demo: methods side by side with NFEs, time, saturation")
    demo.add_argument("--model", default=None, help="diffusers checkpoint directory (default: the shipped model)")
    demo.add_argument("--host", default="127.0.0.1",
                      help="address or host name of this machine to listen on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=None,
                      help="port in [0, 65535], 0: any free one (default: the first free of 7860-7959, as Gradio)")
    demo.add_argument("--concurrency", type=int, default=1,
                      help="requests served at once on the one pipeline (each in its own thread; memory grows "
                      "with it); the others wait in the queue")
    demo.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    demo.set_defaults(func=cmd_demo)
    return demo
