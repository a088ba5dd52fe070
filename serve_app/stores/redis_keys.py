"""The key layout of the Redis store.

Keys. Every key carries a hash tag (`{...}`), so that each script and each transaction touches
one slot of a cluster. The same layout serves all three shapes:

    chatstream:{<app>}:key               the generated cookie-signing key
    chatstream:{<app>}:load              hash of each ingress replica's load report (JSON)
    chatstream:{<app>}:probe             written at start, to refuse a read-only Redis
    chatstream:{<app>|s<k>}:s:<sid>      a session record as JSON, expiring `session_ttl_sec`
                                         after last use; k = crc32(sid) mod shards
    chatstream:{<app>|s<k>}:new          sorted set of shard k's sessions without history, by
                                         last change (bounded: a flood evicts only these)
    chatstream:{<app>|l<k>}:...          ledger shard k (k = crc32(request id) mod shards):
        totals                           outcome, rejection and unknown-error reason counts
        open / open:keys                 admitted requests without an outcome, by record id /
                                         their ledger keys (a request id in use gets a suffix)
        ledger:o, ledger:order           the newest outcomes by request id (bounded)
        ledger:r, ledger:rorder          the newest rejections by request id (bounded)
        done:<record id>                 marks a counted outcome, so a retried write counts once
    chatstream:{<app>|k:<key id>}:...    one API key's limits and usage (see `redis_quotas`)

One server and Sentinel use one shard (the ledger bound is exact); a cluster uses
`CLUSTER_SHARDS`, so that sessions and the ledger spread over the nodes and the totals are no
single hot key: each shard has its own totals, summed on read. The bounds (`max_new_sessions`,
`ledger_size`) are then kept per shard, each a `1/shards` part (rounded up).
"""

from __future__ import annotations

import zlib

# Shards of the session and ledger keys on a Redis Cluster (slots they spread over).
CLUSTER_SHARDS = 32


def shard_of(identifier: str, shards: int) -> int:
    return zlib.crc32(identifier.encode()) % shards if shards > 1 else 0


def request_base(request_id: str) -> str:
    """The client's request id of a ledger key (`<id>~<suffix>` keeps the shard of `<id>`)."""
    return request_id.split("~", 1)[0]


class RedisKeys:
    """The names of one application's keys (`namespace`: its Serve application name)."""

    def __init__(self, namespace: str, shards: int) -> None:
        self.shards = shards
        self._global = f"chatstream:{{{namespace}}}:"
        self._session_prefix = [f"chatstream:{{{namespace}|s{k}}}:" for k in range(shards)]
        self._ledger_prefix = [f"chatstream:{{{namespace}|l{k}}}:" for k in range(shards)]
        self.legacy_prefix = f"chatstream:{namespace}:"  # the layout before hash tags

    def global_key(self, name: str) -> str:
        return self._global + name

    def session(self, session_id: str) -> tuple[str, str, str]:
        """The session's record, its shard's set of new sessions, and the shard's prefix."""
        prefix = self._session_prefix[shard_of(session_id, self.shards)]
        return prefix + "s:" + session_id, prefix + "new", prefix + "s:"

    def ledger_shard(self, request_id: str) -> int:
        return shard_of(request_base(request_id), self.shards)

    def ledger_key(self, shard: int, name: str) -> str:
        return self._ledger_prefix[shard] + name
