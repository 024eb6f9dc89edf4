"""``guidance-engine demo``: the Gradio demo (needs ``pip install gradio``)."""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise ValueError(f"--concurrency: must be an integer >= 1, got {args.concurrency}")
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port: must be in [1, 65535], got {args.port}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("demo: gradio is not installed; pip install 'guidance-engine[demo]' or gradio") from None
    from .demo_app import launch

    launch(model=args.model, host=args.host, port=args.port, concurrency=args.concurrency, device=args.device)
    return 0


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    demo = subparsers.add_parser("demo", help="Gradio demo: methods side by side with NFEs, time, saturation")
    demo.add_argument("--model", default=None, help="diffusers checkpoint directory (default: the shipped model)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)")
    demo.add_argument("--concurrency", type=int, default=1, help="requests served at once by the queue")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(func=cmd_demo)
    return demo
