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
import json
import os
from collections.abc import Sequence
from typing import Any

from .options import OperatorOptions

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
        default=float(env.get("CHATSTREAM_DRIFT_INTERVAL_SEC", "0")),
        help="Seconds between periodic drift checks of each RayService; 0 (the default) means "
        "none: drift is repaired from the RayService watch, and kopf puts no finalizer on the "
        "ChatStreams (a timer needs one). Env: CHATSTREAM_DRIFT_INTERVAL_SEC.",
    )
    parser.add_argument(
        "--allowed-image-repository", action="append", dest="allowed_image_repositories",
        metavar="REPO", default=_split(env.get("CHATSTREAM_ALLOWED_IMAGE_REPOSITORIES", "")),
        help="Allow spec.image only from this repository or below it (repeatable, e.g. "
        "registry.example.com/ml); others get InvalidSpec. None: any image. "
        "Env: CHATSTREAM_ALLOWED_IMAGE_REPOSITORIES (comma-separated).",
    )  # fmt: skip
    parser.add_argument(
        "--network-policy",
        action=argparse.BooleanOptionalAction,
        default=env.get("CHATSTREAM_NETWORK_POLICY", "1") != "0",
        help="Render a NetworkPolicy with each RayService: only the Serve port is open to all "
        "(default on). Env: CHATSTREAM_NETWORK_POLICY=0 turns it off.",
    )
    peer_flags = {
        "control-plane": "may reach every port of the Ray pods (dashboard, GCS, client): "
        "KubeRay's operator (default: pods named kuberay-operator in the namespace "
        "kuberay-system)",
        "metrics": "may scrape the metrics port 8080 (e.g. Prometheus); default none",
    }
    for flag, who in peer_flags.items():
        variable = f"CHATSTREAM_{flag.upper().replace('-', '_')}_PEERS"
        parser.add_argument(
            f"--{flag}-peers",
            type=_peers,
            default=env.get(variable) or None,
            metavar="JSON",
            help=f"JSON list of NetworkPolicyPeers that {who}. Env: {variable}.",
        )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log more.")
    parser.add_argument("--debug", action="store_true", help="Log everything.")
    args = parser.parse_args(argv)
    if not args.namespaces and not args.all_namespaces and env.get("CHATSTREAM_NAMESPACES"):
        args.namespaces = [ns.strip() for ns in env["CHATSTREAM_NAMESPACES"].split(",")]
        args.namespaces = [ns for ns in args.namespaces if ns]
    return args


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _peers(value: str) -> str:
    """A JSON list of NetworkPolicyPeer objects, checked and kept as JSON (for the env)."""
    peers = json.loads(value)
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise argparse.ArgumentTypeError("a JSON list of NetworkPolicyPeer objects is expected")
    return json.dumps(peers)


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
        # The handlers' settings (options.py): kopf hands each handler a copy of the memo.
        "memo": kopf.Memo(options=OperatorOptions.from_args(args)),
    }
    if args.namespaces:
        kwargs["namespaces"] = list(args.namespaces)
    else:
        kwargs["clusterwide"] = True
    return kwargs


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)

    import kopf

    from . import handlers  # registers the handlers with kopf

    handlers.register_drift_timer(args.drift_interval)

    kopf.configure(verbose=args.verbose, debug=args.debug)
    asyncio.run(kopf.operator(**operator_kwargs(args)))


if __name__ == "__main__":
    main()
