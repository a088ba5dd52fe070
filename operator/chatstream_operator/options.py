"""The operator's settings (command-line flags), handed to the handlers as kopf's `memo`.

`chatstream-operator` parses its flags into one `OperatorOptions` and passes it as
`kopf.operator(memo=kopf.Memo(options=...))`; kopf gives every handler a copy of that memo.
Run as `kopf run -m chatstream_operator.handlers`, the handlers find no options there and use
the defaults below.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from .network import DEFAULT_CONTROL_PLANE_PEERS


@dataclasses.dataclass(frozen=True)
class OperatorOptions:
    # spec.image must be in one of these repositories or below one; empty: any image.
    allowed_image_repositories: tuple[str, ...] = ()
    # Render a NetworkPolicy with each RayService, with these peers (NetworkPolicyPeer dicts).
    network_policy: bool = True
    control_plane_peers: tuple[Mapping[str, Any], ...] = tuple(DEFAULT_CONTROL_PLANE_PEERS)
    metrics_peers: tuple[Mapping[str, Any], ...] = ()
    # Period of the optional drift-repair timer; 0: none (and no finalizer).
    drift_interval_sec: float = 0.0
    # Seconds between attempts while a deleted predecessor's child awaits garbage collection.
    recreate_retry_sec: float = 5.0
    # Seconds between checks while a cluster dependency of the spec (the Gateway API) is missing.
    dependency_retry_sec: float = 60.0

    @classmethod
    def from_args(cls, args: Any) -> OperatorOptions:
        """From `chatstream-operator`'s parsed arguments (peers arrive as JSON text)."""
        return cls(
            allowed_image_repositories=tuple(args.allowed_image_repositories or ()),
            network_policy=bool(args.network_policy),
            control_plane_peers=tuple(
                json.loads(args.control_plane_peers)
                if args.control_plane_peers
                else DEFAULT_CONTROL_PLANE_PEERS
            ),
            metrics_peers=tuple(json.loads(args.metrics_peers) if args.metrics_peers else ()),
            drift_interval_sec=float(args.drift_interval),
        )


def options_of(memo: Any) -> OperatorOptions:
    """The options in a handler's memo; the defaults when the operator was started otherwise."""
    options = getattr(memo, "options", None) if memo is not None else None
    return options if isinstance(options, OperatorOptions) else OperatorOptions()
