"""`ggtriton serve`: the command that runs the HTTP server (`api_server`) under uvicorn.

The model loads on a thread while the server already answers (/health says 503 until it is ready); a model
that fails to load stops the server with exit status 1. SIGINT or SIGTERM: uvicorn stops accepting, waits for
the running requests to finish, then the engine stops.
"""

from __future__ import annotations

import argparse

from .cli import _engine_flags, _int_flag, _llm, _template_flag, _template_text, _use_chat_template

SERVE_EXTRA = "ggtriton serve needs its extra: pip install 'ggtriton[serve]'"


def add_command(command) -> None:
    p = command("serve", "OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /metrics")
    _engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_int_flag(lambda n: 0 <= n < 65536, "a port, 0 to 65535"), default=8080,
                   help="port to listen on")
    p.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the file's)")
    p.add_argument("--max-waiting", type=_int_flag(lambda n: n >= 1, "1 or more"), default=1024,
                   help="requests that may wait for a place in the batch; more are answered 503")
    _template_flag(p)
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .api_server import Server
    except ImportError as e:
        raise ValueError(f"{SERVE_EXTRA} ({e})") from None
    template = _template_text(args.chat_template)

    def load():
        llm = _llm(args)
        _use_chat_template(llm, template)
        return llm

    server = Server(load, served_model_name=args.served_model_name, api_key=args.api_key,
                    max_waiting=args.max_waiting)
    http = uvicorn.Server(uvicorn.Config(server.app, host=args.host, port=args.port, log_level="info"))

    def stop() -> None:
        http.should_exit = True

    server.on_load_failure = stop
    http.run()
    return 1 if server.load_error else 0
