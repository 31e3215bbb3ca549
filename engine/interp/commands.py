"""The ``saescope explain`` and ``saescope llm-server`` commands (registered by ``engine.cli``)."""

from __future__ import annotations

import argparse
import json
import sys

from .. import configs, settings


def cmd_explain(args: argparse.Namespace) -> int:
    from .backends import EndpointError, make_backend
    from .embed import Embedder
    from .explain import ExplainConfig, explain_run, summary

    cfg = configs.from_args(ExplainConfig, args)
    scorers = cfg.scorers
    explainer = make_backend(args.explainer, model=args.explainer_model, device=args.device, dtype=args.dtype,
                             concurrency=args.concurrency, timeout=args.timeout)
    judge = None
    if args.scorer_model and ({"detection", "fuzzing", "intruder"} & set(scorers)):
        judge = make_backend(args.scorer_model, model=args.scorer_model_name, device=args.device, dtype=args.dtype,
                             concurrency=args.concurrency, timeout=args.timeout)
    embedder = None if args.no_embed else Embedder(args.embedder if args.embedder != "default" else None)
    try:
        stats = explain_run(args.run, explainer, judge=judge, embedder=embedder, cfg=cfg)
    except EndpointError as err:
        raise ValueError(f"{err} (what was written before stays; rerun to continue)") from err
    from .report import report

    stats["mean_scores"] = summary(args.run)
    stats["report"] = report(args.run)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_llm_server(args: argparse.Namespace) -> int:
    from .backends import TOKEN_ENV, LocalChat, is_loopback
    from .server import ServerConfig, new_token, serve_forever

    token = settings.get(settings.LLM_TOKEN) or None
    if token is None and not is_loopback(args.host):
        token = new_token()
        print(f"saescope llm-server: {args.host} is not loopback and ${TOKEN_ENV} is unset, so clients need this "
              f"generated token (saescope clients: export {TOKEN_ENV}={token})", file=sys.stderr, flush=True)
    config = ServerConfig(token=token, max_requests=args.max_requests, timeout=args.timeout,
                          allow_hosts=tuple(args.allow_host or ()))
    chat = LocalChat(args.model, device=args.device, dtype=args.dtype)
    serve_forever(chat, args.host, args.port, args.name or chat.name, config)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("explain", help="write LLM explanations and delphi-style scores of a run's latents into it")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--explainer", default="demo",
                   help="a local chat model (directory, hub id, or 'demo' = SmolLM2-135M-Instruct) or an "
                        "OpenAI-compatible endpoint http://host:port/v1")
    p.add_argument("--explainer-model",
                   help="the served model's name, with an endpoint (key: $SAESCOPE_EXPLAINER_KEY, else llm-server's "
                        "$SAESCOPE_LLM_TOKEN, else $OPENAI_API_KEY for https://api.openai.com only; a key goes over plain "
                        "http only to loopback unless $SAESCOPE_EXPLAINER_ALLOW_HTTP=1)")
    p.add_argument("--scorer-model",
                   help="model that answers detection/fuzzing/intruder (default: the explainer); same forms as --explainer")
    p.add_argument("--scorer-model-name", help="the served model's name when --scorer-model is an endpoint")
    p.add_argument("--embedder", default="default", help="sentence-embedding model folder (default: all-MiniLM-L6-v2 from PyPI)")
    p.add_argument("--no-embed", action="store_true", help="no embeddings (no embedding score, no search by meaning)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight to an endpoint")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per endpoint request")
    from .explain import ExplainConfig

    configs.add_arguments(p, ExplainConfig, skip=("extra",))
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("llm-server", help="serve a local chat model over an OpenAI-compatible API (token: $SAESCOPE_LLM_TOKEN)")
    p.add_argument("--model", default="demo", help="directory, hub id, or 'demo'")
    p.add_argument("--name", help="the model name clients send (default: local:<model>)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1); any other than loopback needs a token: $SAESCOPE_LLM_TOKEN, "
                        "else one is generated and printed")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="a host name clients may call the server by (repeatable; loopback names, IP addresses and --host "
                        "are always accepted)")
    p.add_argument("--max-requests", type=int, default=4, help="chat requests taken at once; more are answered 503")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a socket read or write may block (a client that stops reading is dropped)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_llm_server)
