"""`noisecraft ui`: the local web UI (Gradio, the optional `ui` extra).

    noisecraft ui [--models DIR ...] [--port 7860] [--host 127.0.0.1] [--auth USER:PASS | --auth-file FILE]

Binds 127.0.0.1 unless told otherwise, and refuses any other address without a password; never shares a public
link; opens only models under the --models folders (default ./runs).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NoisecraftError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parsers(sub) -> None:
    u = sub.add_parser("ui", help="a local web UI: generate, edit, watch it denoise, train (pip install '.[ui]')")
    u.add_argument("--models", nargs="+", default=["runs"], metavar="DIR",
                   help="folders with runs, diffusers folders and .safetensors/.ckpt files (default: ./runs); "
                        "the UI opens nothing outside them")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs --auth or --auth-file)")
    auth = u.add_mutually_exclusive_group()
    auth.add_argument("--auth", default=None, metavar="USER:PASS", help="require this user name and password")
    auth.add_argument("--auth-file", default=None, metavar="FILE", help="a file of USER:PASS lines")
    u.add_argument("--outputs", default="outputs/ui", help="where generated PNGs go (default outputs/ui)")
    u.add_argument("--device", default="cpu")
    u.set_defaults(func=cmd_ui)


def parse_auth(auth: str | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """[(user, password), ...] from --auth or --auth-file, or None."""
    if auth is None and auth_file is None:
        return None
    if auth is not None:
        lines, where = [auth], "--auth"
    else:
        try:
            lines, where = Path(auth_file).expanduser().read_text().splitlines(), str(auth_file)
        except (OSError, UnicodeDecodeError) as e:
            raise NoisecraftError(f"cannot read the password file {auth_file} ({type(e).__name__}); give a "
                                  "readable file of USER:PASS lines.") from None
    pairs = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise NoisecraftError(f"{where} must hold USER:PASS (a user name, a colon, a password).")
        pairs.append((user, password))
    if not pairs:
        raise NoisecraftError(f"{where} holds no USER:PASS line.")
    return pairs


def check_host(host: str, auth) -> None:
    if host not in LOCAL_HOSTS and not auth:
        raise NoisecraftError(f"--host {host} would let anyone on the network use this machine; add --auth "
                              "USER:PASS or --auth-file FILE, or keep the default 127.0.0.1.")


def cmd_ui(args) -> int:
    auth = parse_auth(args.auth, args.auth_file)
    check_host(args.host, auth)
    if not 0 < args.port < 65536:
        raise NoisecraftError(f"--port must be between 1 and 65535, got {args.port}.")
    demo, _ = create(args.models, outputs=args.outputs, device=args.device)
    print(f"noisecraft ui: models under {', '.join(str(Path(m).resolve()) for m in args.models)}; "
          f"open http://{'127.0.0.1' if args.host in LOCAL_HOSTS else args.host}:{args.port}")
    launch(demo, host=args.host, port=args.port, auth=auth, outputs=args.outputs)
    return 0


def create(models, outputs="outputs/ui", device="cpu", announce: bool = True):
    """(the Gradio app, (server threads, training threads)); torch's threads set so that the server and one training
    subprocess together use at most the machine's cores."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise NoisecraftError("the UI needs Gradio: pip install -e '.[ui]' (or pip install 'noisecraft[ui]').") \
            from None
    import torch

    from ..ui.app import build_app
    from ..ui.engine import Engine
    from ..ui.library import ModelLibrary
    from ..ui.training import thread_split

    threads = thread_split()
    torch.set_num_threads(threads[0])
    if announce:
        print(f"noisecraft ui: torch uses {threads[0]} thread(s) in this server and {threads[1]} in a training run "
              f"started from the UI ({os.cpu_count()} cores), so the two never oversubscribe the CPU.")
    library = ModelLibrary(models)
    engine = Engine(library, outputs, device=device)
    return build_app(library, engine, threads), threads


def launch(demo, host="127.0.0.1", port=7860, auth=None, outputs="outputs/ui", block: bool = True):
    """Serve the app: queue of one generation at a time, local assets only, never a public share link."""
    check_host(host, auth)
    Path(outputs).mkdir(parents=True, exist_ok=True)
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo.launch(server_name=host, server_port=port, share=False, auth=auth, inbrowser=False,
                       prevent_thread_lock=not block, show_error=False, ssr_mode=False, quiet=not block,
                       allowed_paths=[str(Path(outputs).resolve())])
