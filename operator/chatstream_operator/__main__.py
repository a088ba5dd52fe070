"""`chatstream-operator`: run the operator (what `kopf run -m chatstream_operator.handlers` does,
with the namespace scope, liveness endpoint and peering taken from flags or the environment).

Examples:
    chatstream-operator --all-namespaces
    chatstream-operator -n team-a -n team-b --liveness http://0.0.0.0:8080/healthz
    CHATSTREAM_NAMESPACES=chat chatstream-operator --peering chatstream-operator
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence
from typing import Any

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="chatstream-operator",
        description="Deploys ChatStream custom resources as KubeRay RayServices.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="Serve this namespace (repeatable; globs like 'team-*' allowed). "
        "Env: CHATSTREAM_NAMESPACES (comma-separated).",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="Serve every namespace (the default when no namespace is given).",
    )
    parser.add_argument(
        "--liveness",
        default=env.get("CHATSTREAM_LIVENESS", DEFAULT_LIVENESS),
        help=f"Liveness endpoint URL; empty disables it (default {DEFAULT_LIVENESS}). "
        "Env: CHATSTREAM_LIVENESS.",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        default=env.get("CHATSTREAM_PEERING") or None,
        help="kopf peering object name, so that one of several operator replicas is active "
        "(needs kopf's peering CRDs). Env: CHATSTREAM_PEERING.",
    )
    peering.add_argument(
        "--standalone",
        action="store_true",
        default=env.get("CHATSTREAM_STANDALONE", "") == "1",
        help="No peering: a single replica that never pauses for others.",
    )
    parser.add_argument(
        "--priority", type=int, default=0, help="Peering priority (the highest one is active)."
    )
    parser.add_argument(
        "--drift-interval",
        type=float,
        default=float(env.get("CHATSTREAM_DRIFT_INTERVAL_SEC", "60")),
        help="Seconds between drift checks of each RayService (default 60).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log more.")
    parser.add_argument("--debug", action="store_true", help="Log everything.")
    args = parser.parse_args(argv)
    if not args.namespaces and not args.all_namespaces and env.get("CHATSTREAM_NAMESPACES"):
        args.namespaces = [ns.strip() for ns in env["CHATSTREAM_NAMESPACES"].split(",")]
        args.namespaces = [ns for ns in args.namespaces if ns]
    return args


def _exact(pattern: str) -> bool:
    return not any(char in pattern for char in "*?[!")


def operator_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of `kopf.operator` for the parsed command line."""
    import kopf

    settings = kopf.OperatorSettings()
    # Exact namespace names need no cluster-wide scan of namespaces and CRDs, so a namespaced
    # install needs no cluster-scoped RBAC at all. (Resources are then discovered at startup
    # only: install KubeRay before the operator, or restart it after.)
    settings.scanning.disabled = bool(args.namespaces) and all(map(_exact, args.namespaces))
    kwargs: dict[str, Any] = {
        "settings": settings,
        "liveness_endpoint": args.liveness or None,
        "priority": args.priority,
        "standalone": bool(args.standalone),
        "peering_name": None if args.standalone else args.peering,
    }
    if args.namespaces:
        kwargs["namespaces"] = list(args.namespaces)
    else:
        kwargs["clusterwide"] = True
    return kwargs


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # The timer's interval is read when the handlers are imported.
    os.environ["CHATSTREAM_DRIFT_INTERVAL_SEC"] = str(args.drift_interval)

    import kopf

    from . import handlers  # noqa: F401  (registers the handlers with kopf)

    kopf.configure(verbose=args.verbose, debug=args.debug)
    asyncio.run(kopf.operator(**operator_kwargs(args)))


if __name__ == "__main__":
    main()
