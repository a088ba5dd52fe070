"""The shapes of Redis that production runs, with real servers on loopback (tests/redis_server.py):
a Redis Cluster (`redis+cluster://`) and a primary with a replica behind three Sentinels
(`redis+sentinel://`), and what the store refuses at start, with one line naming the setting.

- Start-up refusals: a cluster behind a plain URL, a plain server behind a cluster URL, a
  read-only replica, an unknown Sentinel service, wrong credentials, an unreachable Redis.
- Sentinel failover under load: the primary is SIGKILLed while workers write outcomes and
  session turns. Calls meanwhile raise StoreUnavailable (never hang, never another error),
  then succeed on the new primary; every outcome acknowledged (with WAIT) is there, each counted
  once, and every acknowledged turn is in its session.
- A cluster node that stops: StoreUnavailable, then the same store works once it is back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from functools import partial

import pytest

from serve_app.session_state import TurnInProgress, begin_turn, finish_turn
from serve_app.stores import StoreMisconfigured, StoreSettings, StoreUnavailable, make_store
from serve_app.stores.redis_store import RedisStore
from serve_app.stores.redis_url import parse_redis_url
from tests.redis_server import RedisClusterServers, RedisServer, SentinelSet, free_port

SETTING = "CHATSTREAM_REDIS_URL"
HANG_GUARD_S = 15.0


def settings(**overrides) -> StoreSettings:
    return StoreSettings(**{"namespace": f"ns-{uuid.uuid4().hex[:8]}", **overrides})


# --------------------------------------------------------------------------- the URL
def test_the_url_names_the_shape_and_chatstreams_options():
    plain = parse_redis_url("redis://:secret@h:6380/2?wait_replicas=1&health_check_interval=5")
    assert plain.mode == "standalone" and plain.wait_replicas == 1
    assert "wait_replicas" not in plain.url and "health_check_interval=5" in plain.url
    assert plain.describe() == "redis://h:6380/2"  # no password in messages

    cluster = parse_redis_url("rediss+cluster://u:p%40ss@a:7000,b,[::1]:7002")
    assert cluster.mode == "cluster" and cluster.ssl
    assert cluster.nodes == (("a", 7000), ("b", 6379), ("::1", 7002))
    assert (cluster.username, cluster.password, cluster.wait_replicas) == ("u", "p@ss", 0)
    assert "p@ss" not in cluster.describe()

    sentinel = parse_redis_url(
        "redis+sentinel://:pw@s1,s2:26380/mymaster/3?sentinel_password=sp&wait_timeout_ms=250"
    )
    assert sentinel.mode == "sentinel" and sentinel.service == "mymaster" and sentinel.db == 3
    assert sentinel.nodes == (("s1", 26379), ("s2", 26380))
    assert (sentinel.password, sentinel.sentinel_password) == ("pw", "sp")
    assert (sentinel.wait_replicas, sentinel.wait_timeout_ms) == (1, 250)  # WAIT by default


@pytest.mark.parametrize(
    "url, says",
    [
        ("http://h:6379", "unknown scheme"),
        ("redis+sentinel://s1:26379", "name the Sentinel service"),
        ("redis+cluster://a:7000/3", "database 0 only"),
        ("redis+cluster://a:7000?timeout=3", "unknown option"),
        ("redis+cluster://a:port", "bad port"),
        ("redis://h?wait_replicas=x", "integers"),
    ],
)
def test_a_url_that_cannot_work_is_refused_naming_the_setting(url, says):
    with pytest.raises(ValueError, match=says) as refused:
        parse_redis_url(url)
    assert str(refused.value).startswith(SETTING)


def test_wait_on_a_cluster_is_refused():
    with pytest.raises(ValueError, match="wait_replicas is not supported"):
        RedisStore(settings(), "redis+cluster://127.0.0.1:7000?wait_replicas=1")


# --------------------------------------------------------------------------- start-up refusals
@pytest.fixture(scope="module")
def redis_cluster():
    with RedisClusterServers(masters=3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def sentinels():
    with SentinelSet(replicas=1, sentinels=3) as servers:
        yield servers


async def refusal(url: str, **verify) -> str:
    """What `verify` and the first `signing_key` (the ingress's start) say about `url`."""
    store = make_store("redis", settings(), redis_url=url)
    try:
        with pytest.raises(StoreMisconfigured) as refused:
            await asyncio.wait_for(store.verify(**verify), HANG_GUARD_S)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(SETTING + ": ")
        if not verify:  # the same refusal when the ingress only asks for the key
            with pytest.raises(StoreMisconfigured, match="^" + SETTING):
                await store.signing_key()
        return message
    finally:
        await store.close()


async def test_a_cluster_behind_a_plain_url_is_refused(redis_cluster):
    message = await refusal(redis_cluster.nodes[0].url)
    assert "is a Redis Cluster node" in message and "redis+cluster://" in message


async def test_a_plain_server_behind_a_cluster_url_is_refused(redis_server):
    message = await refusal(f"redis+cluster://127.0.0.1:{redis_server.port}")
    assert "is not a Redis Cluster" in message and "redis://" in message


async def test_a_read_only_replica_is_refused(sentinels):
    replica_port = next(s.port for s in sentinels.data if s.port != sentinels.primary_port())
    message = await refusal(f"redis://127.0.0.1:{replica_port}/0")
    assert "read-only replica" in message and "redis+sentinel://" in message


async def test_an_unknown_sentinel_service_is_refused(sentinels):
    message = await refusal(sentinels.url.replace(sentinels.service, "no-such-service"))
    assert "no service 'no-such-service'" in message and sentinels.service in message


async def test_wrong_credentials_are_refused():
    with RedisServer(extra_config=["requirepass right-password"]) as server:
        message = await refusal(f"redis://:wrong-password@127.0.0.1:{server.port}/0")
        assert "credentials" in message and "wrong-password" not in message


async def test_an_unreachable_redis_is_refused_after_a_short_wait():
    port = free_port()
    started = time.monotonic()
    message = await refusal(f"redis://:pw@127.0.0.1:{port}/0", wait_sec=1.0)
    assert time.monotonic() - started < 10
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in message
    assert ":pw@" not in message


async def test_the_right_urls_pass(redis_server, redis_cluster, sentinels):
    for url in (redis_server.url, redis_cluster.url, sentinels.url):
        store = make_store("redis", settings(), redis_url=url)
        try:
            await store.verify()
            assert len(await store.signing_key()) >= 32
        finally:
            await store.close()


# --------------------------------------------------------------------------- cluster
async def test_cluster_sessions_and_ledger_spread_over_every_node(redis_cluster):
    """No hot key: the ledger's totals and the sessions land on every primary."""
    import redis

    store = RedisStore(settings(), redis_cluster.url)
    try:
        for index in range(64):
            await store.record_outcome(f"rec-{index}", f"req-{index}", "success")
            await store.change_session(f"s-{index}", finish_turn("none", epoch=-1))
        assert (await store.outcome_totals())["outcomes"]["success"] == 64
    finally:
        await store.close()
    namespace = store.settings.namespace
    for node in redis_cluster.nodes:
        with redis.Redis(port=node.port, decode_responses=True) as client:
            keys = list(client.scan_iter(f"chatstream:{{{namespace}|*"))
        assert any(k.endswith(":totals") for k in keys), node.port
        assert any(":s:" in k for k in keys), node.port


async def test_a_new_store_on_the_cluster_finds_the_key_and_the_conversation(redis_cluster):
    """What a restart of Serve and Ray relies on: a new store object (a new ingress replica)
    gets the same generated signing key and the stored conversation."""
    shared = settings()
    first, second = (RedisStore(shared, redis_cluster.url) for _ in range(2))
    try:
        keys = await asyncio.gather(first.signing_key(), second.signing_key())
        assert keys[0] == keys[1]
        record = await first.change_session("s-1", begin_turn("t-1", time.time(), 60))
        await first.change_session(
            "s-1",
            finish_turn(
                "t-1",
                record["epoch"],
                user_message={"role": "user", "content": "q"},
                answer={"role": "assistant", "content": "a", "message_id": "m-1"},
            ),
        )
    finally:
        await first.close()
        await second.close()
    after = RedisStore(shared, redis_cluster.url)
    try:
        assert await after.signing_key() == keys[0]
        assert [m["content"] for m in (await after.load_session("s-1"))["messages"]] == ["q", "a"]
    finally:
        await after.close()


async def test_a_stopped_cluster_node_means_store_unavailable_then_working():
    """A primary without a replica is killed (its data kept on disk: append-only file)."""
    with RedisClusterServers(masters=3, durable=True) as cluster:
        store = RedisStore(settings(), cluster.url)
        try:
            await store.record_outcome("rec-before", "req-before", "success")
            cluster.nodes[1].stop(hard=True)
            seen = set()
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:  # until the cluster reports itself down
                try:
                    await asyncio.wait_for(store.outcome_totals(), HANG_GUARD_S)
                    seen.add("answered")
                except StoreUnavailable:
                    seen.add("StoreUnavailable")
                    break
            assert "StoreUnavailable" in seen
            cluster.nodes[1].start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    totals = await asyncio.wait_for(store.outcome_totals(), HANG_GUARD_S)
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the cluster did not come back"
                    await asyncio.sleep(0.5)
            assert totals["outcomes"]["success"] == 1
            await store.record_outcome("rec-after", "req-after", "success")
        finally:
            await store.close()


# --------------------------------------------------------------------------- Sentinel failover
async def retried(call, log: list[str], timeout_s: float = 60.0):
    """Call until it answers, as the ingress's bookkeeping does; log what each try raised."""
    deadline = time.monotonic() + timeout_s
    while True:
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(call(), HANG_GUARD_S)
            log.append("ok")
            return result
        except StoreUnavailable:
            log.append("StoreUnavailable")
        except TimeoutError:
            log.append("hang")
        except Exception as exc:
            log.append(f"{type(exc).__name__}: {exc}")
        assert time.monotonic() - started < HANG_GUARD_S
        assert time.monotonic() < deadline, log[-5:]
        await asyncio.sleep(0.2)


async def test_a_dropped_connection_reconnects_to_the_new_primary_not_the_old():
    """The old primary, restarted after a failover, is a primary for some seconds until the
    sentinels demote it (and then drops what it took meanwhile). A connection that dropped and
    reconnects inside a command's retry must go to the primary the sentinels name now (redis-py
    alone reconnects to the address it had: see `_PrimaryConnection`)."""
    with SentinelSet(replicas=1, sentinels=1) as servers:
        store = RedisStore(settings(), servers.url)
        try:
            await store.record_rejection("before", "invalid_json")
            pool = store._redis.connection_pool
            connection = await pool.get_connection()
            old = servers.primary_port()
            assert connection.port == old
            await asyncio.to_thread(servers.kill_primary)
            new = await asyncio.to_thread(servers.wait_for_failover, old)
            await asyncio.to_thread(servers.server_on(old).start)  # a primary, for now
            await connection.disconnect()
            await connection.send_command("ROLE")  # what a command's retry does
            role = await connection.read_response()
            assert (connection.port, role[0]) == (new, "master")
            await pool.release(connection)
        finally:
            await store.close()


async def test_sentinel_failover_mid_load_loses_nothing_acknowledged(sentinels):
    """Last in the module: it fails the module's Sentinel set over (to save a set-up)."""
    servers = sentinels
    store = RedisStore(settings(), servers.url)
    await store.verify()
    acked: list[str] = []
    turns: dict[str, list[str]] = {}
    log: list[str] = []
    killed = asyncio.Event()

    async def worker(worker_id: int) -> None:
        session_id = f"session-{worker_id}"
        turns[session_id] = []
        for index in range(40):
            record_id, request_id = uuid.uuid4().hex, f"w{worker_id}-{index}"
            request_id = await retried(
                partial(store.open_request, record_id, request_id, "replica-a"), log
            )
            turn_id = f"turn-{worker_id}-{index}"

            async def begin(turn_id: str = turn_id) -> dict:
                try:
                    return await store.change_session(
                        session_id, begin_turn(turn_id, time.time(), 60)
                    )
                except TurnInProgress:  # our own try whose answer the crash cut off
                    record = await store.load_session(session_id)
                    if record["turn"]["id"] != turn_id:
                        raise
                    return record

            record = await retried(begin, log)
            answer = {"role": "assistant", "content": f"a{index}", "message_id": turn_id}
            change = finish_turn(
                turn_id,
                record["epoch"],
                user_message={"role": "user", "content": f"q{index}"},
                answer=answer,
            )
            await retried(partial(store.change_session, session_id, change), log)
            turns[session_id].append(f"a{index}")
            await retried(partial(store.record_outcome, record_id, request_id, "success"), log)
            acked.append(request_id)
            if index == 10 and worker_id == 0:
                killed.set()
            await asyncio.sleep(0.02)

    async def kill_primary() -> tuple[int, int]:
        """Kill the primary; once a replica took over, start the old one again (as its
        pod would be): the sentinels make it a replica, which outcomes WAIT for."""
        await killed.wait()
        old = await asyncio.to_thread(servers.kill_primary)
        new = await asyncio.to_thread(servers.wait_for_failover, old)
        await asyncio.to_thread(servers.server_on(old).start)
        return old, new

    try:
        *_, (old, new) = await asyncio.gather(*(worker(i) for i in range(6)), kill_primary())
        assert new != old  # the sentinels failed over
        # On a loaded machine they may fail over once more (down-after is 1 s: seen in CI, back
        # to the restarted old primary). What this test guards holds whichever is primary now:
        # nothing acknowledged is lost.
        assert servers.primary_port() in {new, old}
        assert "StoreUnavailable" in log, "the failover went unnoticed"
        assert set(log) == {"ok", "StoreUnavailable"}, {e for e in log if e != "ok"}
        totals = await store.outcome_totals()
        assert totals["outcomes"]["success"] == len(acked) == 6 * 40  # each once
        assert totals["open"] == 0
        ledger = await store.outcome_ledger(acked)
        assert ledger["outcomes"] == dict.fromkeys(acked, "success")
        for session_id, answers in turns.items():
            record = await store.load_session(session_id)
            assert [m["content"] for m in record["messages"][1::2]] == answers
            assert record["turn"] is None
    finally:
        await store.close()
