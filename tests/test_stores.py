"""One contract for every state store (serve_app.stores), run against the memory store and the
Redis store (a real redis-server on loopback, tests/redis_server.py; no fakes).

The Redis store's part runs twice: on one redis-server and on a 3-node Redis Cluster
(`redis+cluster://`, where every script must keep to one slot and sessions and the ledger are
sharded; its bounds then hold per shard, see `capacity`).

The contract: every session change is atomic on the store's side (concurrent changes lose
nothing, a clear during a turn stays cleared), one active turn per session, sliding expiry,
a flood of new clients cannot evict an established conversation, an idempotent and bounded
outcome ledger, ordered and expiring load reports, and, for Redis, a signing key shared by
every replica, `StoreUnavailable` (never a hang) while Redis is down, and recovery without a
new store object once it is back.

The Ray actor store (a private local Ray cluster in this process) is checked for what its
actor's restart must keep and how calls behave meanwhile.

The concurrency scenario is also run against `ReadModifyWrite`, the previous code's way of
changing a session (load it, change it in the ingress, save the whole record back), to show
that the scenario detects lost updates.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from serve_app.session_state import (
    Record,
    SessionChange,
    SessionLimits,
    TurnInProgress,
    UnknownMessage,
    add_feedback,
    apply_change,
    begin_turn,
    clear,
    finish_turn,
    set_params,
)
from serve_app.stores import StateStore, StoreSettings, StoreUnavailable
from serve_app.stores.memory import MemoryStore
from serve_app.stores.redis_store import RedisStore
from tests.redis_server import RedisClusterServers, RedisServer

LEASE = 60.0
# A store call that does not return within this is a hang (Redis' own timeouts are 2 s).
HANG_GUARD_S = 15.0

MakeStore = Callable[..., StateStore]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str, message_id: str) -> dict:
    return {"role": "assistant", "content": text, "message_id": message_id}


def new_id(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def redis_cluster():
    """A 3-node Redis Cluster for the module (redis-cli --cluster create), keys apart by
    namespace."""
    with RedisClusterServers(masters=3) as cluster:
        yield cluster


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_store(request) -> AsyncIterator[MakeStore]:
    """`make_store(**settings)`: a store of the parametrized kind, in a namespace of its own
    (pass `namespace=` to share one)."""
    created: list[StateStore] = []
    default_namespace = new_id("ns")

    def make(**overrides) -> StateStore:
        settings = StoreSettings(**{"namespace": default_namespace, **overrides})
        if request.param == "memory":
            store: StateStore = MemoryStore(settings)
        elif request.param == "cluster":
            cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
            store = RedisStore(settings, cluster.url)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisStore(settings, server.url)
        created.append(store)
        return store

    yield make
    for store in created:
        await store.close()


def shards(store: StateStore) -> int:
    """How many parts the store splits its bounds into (a cluster's Redis store: 32)."""
    return getattr(store, "shards", 1)


def newest_per_shard(store: StateStore, ids: list[str], bound: int) -> set[str]:
    """Of `ids` (oldest first), what a bound of `bound` keeps: the newest `bound`, or on a
    sharded store the newest `ceil(bound / shards)` of each ledger shard."""
    if shards(store) == 1:
        return set(ids[-bound:])
    per_shard = -(-bound // shards(store))
    groups: dict[int, list[str]] = {}
    for request_id in ids:
        groups.setdefault(store._ledger_shard(request_id), []).append(request_id)
    return {i for group in groups.values() for i in group[-per_shard:]}


async def with_history(store: StateStore | ReadModifyWrite, session_id: str, turns: int) -> Record:
    """A session with `turns` answered turns (message ids m0, m1, ...)."""
    record = None
    for index in range(turns):
        turn_id = f"turn-{index}"
        record = await store.change_session(session_id, begin_turn(turn_id, time.time(), LEASE))
        record = await store.change_session(
            session_id,
            finish_turn(
                turn_id,
                record["epoch"],
                user_message=user(f"q{index}"),
                answer=answer(f"a{index}", f"m{index}"),
            ),
        )
    return record


# --------------------------------------------------------------------------- atomic changes
class ReadModifyWrite:
    """The previous code's session writes: load, change in the ingress, save the whole record
    back (two store calls, with other requests' calls in between)."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._limits = SessionLimits()

    async def load_session(self, session_id):
        return await self._store.load_session(session_id)

    async def change_session(self, session_id: str, change: SessionChange) -> Record:
        record = await self._store.load_session(session_id)
        await asyncio.sleep(0)  # the second actor call: other requests run meanwhile
        changed = apply_change(record, change, self._limits)
        self._store._state.sessions.put(session_id, changed)
        return changed


async def concurrent_changes_while_a_turn_finishes(
    store: StateStore | ReadModifyWrite,
) -> list[str]:
    """25 params updates and 25 feedbacks race the end of a turn; returns what got lost."""
    session_id = new_id()
    await with_history(store, session_id, 25)
    record = await store.change_session(session_id, begin_turn("live", time.time(), LEASE))
    changes = [set_params({f"p{i}": i}) for i in range(25)]
    changes += [add_feedback(f"m{i}", {"rating": "good", "comment": str(i)}) for i in range(25)]
    finish = finish_turn(
        "live", record["epoch"], user_message=user("live q"), answer=answer("live a", "m-live")
    )
    changes.insert(len(changes) // 2, finish)
    await asyncio.gather(*(store.change_session(session_id, c) for c in changes))

    final = await store.load_session(session_id)
    problems = []
    if final["params"] != {f"p{i}": i for i in range(25)}:
        problems.append(f"params lost: {25 - len(final['params'])}")
    if set(final["feedback"]) != {f"m{i}" for i in range(25)}:
        problems.append(f"feedback lost: {25 - len(final['feedback'])}")
    if final["messages"][-1:] != [answer("live a", "m-live")] or len(final["messages"]) != 52:
        problems.append(f"the answer was lost ({len(final['messages'])} messages)")
    if final["turn"] is not None:
        problems.append("the turn was not released")
    return problems


async def test_concurrent_changes_while_a_turn_finishes_lose_nothing(make_store):
    assert await concurrent_changes_while_a_turn_finishes(make_store()) == []


async def test_the_concurrency_scenario_catches_read_modify_write():
    """Negative control: the previous code's load-change-save loses updates in this scenario."""
    store = ReadModifyWrite(MemoryStore(StoreSettings(namespace="control")))
    assert await concurrent_changes_while_a_turn_finishes(store) != []


async def test_concurrent_clears_and_params_while_a_turn_finishes(make_store):
    store = make_store()
    session_id = new_id()
    await with_history(store, session_id, 3)
    record = await store.change_session(session_id, begin_turn("live", time.time(), LEASE))
    epoch = record["epoch"]
    changes = [clear() if i % 2 else set_params({f"p{i}": i}) for i in range(50)]
    changes.insert(
        10, finish_turn("live", epoch, user_message=user("q"), answer=answer("late", "m-late"))
    )
    await asyncio.gather(*(store.change_session(session_id, c) for c in changes))
    final = await store.load_session(session_id)
    assert final["epoch"] == epoch + 25  # every clear counted
    assert final["params"] == {f"p{i}": i for i in range(0, 50, 2)}
    assert final["messages"] == [] and final["feedback"] == {}
    assert final["turn"] is None


async def test_a_clear_during_a_turn_stays_cleared(make_store):
    store = make_store()
    session_id = new_id()
    await with_history(store, session_id, 2)
    record = await store.change_session(session_id, begin_turn("live", time.time(), LEASE))
    await store.change_session(session_id, clear())
    await store.change_session(
        session_id,
        finish_turn("live", record["epoch"], user_message=user("q"), answer=answer("a", "m9")),
    )
    final = await store.load_session(session_id)
    assert final["messages"] == []
    assert final["turn"] is None
    with pytest.raises(UnknownMessage):  # the cleared answers cannot be rated any more
        await store.change_session(session_id, add_feedback("m0", {"rating": "good"}))


# --------------------------------------------------------------------------- one active turn
async def test_a_second_turn_is_refused_until_the_first_finishes(make_store):
    store = make_store()
    session_id = new_id()
    await with_history(store, session_id, 1)
    now = time.time()
    held = await store.change_session(session_id, begin_turn("first", now, LEASE))
    with pytest.raises(TurnInProgress):
        await store.change_session(session_id, begin_turn("second", now + 1, LEASE))
    # The refusal changed nothing: the first turn still holds the lock.
    assert (await store.load_session(session_id))["turn"]["id"] == "first"
    await store.change_session(session_id, finish_turn("first", held["epoch"]))
    taken = await store.change_session(session_id, begin_turn("second", now + 2, LEASE))
    assert taken["turn"]["id"] == "second"
    # Its holder died: after the lease, a new turn may start.
    with pytest.raises(TurnInProgress):
        await store.change_session(session_id, begin_turn("third", now + 2 + LEASE - 1, LEASE))
    taken = await store.change_session(session_id, begin_turn("third", now + 3 + LEASE, LEASE))
    assert taken["turn"]["id"] == "third"


async def test_of_many_simultaneous_turns_exactly_one_begins(make_store):
    store = make_store()
    session_id = new_id()
    now = time.time()
    results = await asyncio.gather(
        *(store.change_session(session_id, begin_turn(f"t{i}", now, LEASE)) for i in range(20)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, TurnInProgress) for r in results if r not in winners)
    assert (await store.load_session(session_id))["turn"]["id"] == winners[0]["turn"]["id"]


# --------------------------------------------------------------------------- expiry and bounds
async def test_unknown_sessions_are_not_created_by_reading(make_store):
    store = make_store()
    session_id = new_id()
    assert await store.load_session(session_id) is None
    assert await store.load_session(session_id) is None


async def test_sessions_expire_from_last_use(make_store):
    store = make_store(session_ttl_sec=3.0)
    session_id = new_id()
    await store.change_session(session_id, set_params({"top_k": 1}))
    for step in range(4):  # used every second: alive well past 3 s after its creation
        await asyncio.sleep(1.0)
        if step == 1:
            await store.change_session(session_id, set_params({"top_k": 2}))
        else:
            assert await store.load_session(session_id) is not None
    assert (await store.load_session(session_id))["params"] == {"top_k": 2}
    await asyncio.sleep(3.6)  # unused for longer than the TTL
    assert await store.load_session(session_id) is None


async def test_a_flood_of_new_sessions_does_not_evict_an_established_one(make_store):
    store = make_store(max_new_sessions=20, max_sessions=1000)
    established = new_id("established")
    await with_history(store, established, 2)
    flood = [new_id("flood") for _ in range(100)]
    for start in range(0, len(flood), 25):
        await asyncio.gather(
            *(store.change_session(s, set_params({"top_k": 1})) for s in flood[start : start + 25])
        )
    latest = new_id("latest")
    await store.change_session(latest, set_params({"top_k": 2}))
    record = await store.load_session(established)
    assert record is not None
    assert [m["content"] for m in record["messages"]] == ["q0", "a0", "q1", "a1"]
    # The bound did apply, to the new sessions only: the oldest went, the newest stayed.
    assert await store.load_session(latest) is not None
    if shards(store) == 1:
        assert await store.load_session(flood[0]) is None
    else:  # per shard: at most ceil(20 / shards) new sessions in each
        alive = [s for s in flood if await store.load_session(s) is not None]
        assert len(alive) + 1 <= -(-20 // shards(store)) * shards(store) < len(flood)


async def test_a_flood_does_not_evict_a_session_in_its_first_turn(make_store):
    store = make_store(max_new_sessions=20, max_sessions=1000)
    session_id = new_id("first-turn")
    record = await store.change_session(session_id, begin_turn("live", time.time(), LEASE))
    for _ in range(4):
        await asyncio.gather(
            *(store.change_session(new_id("flood"), set_params({})) for _ in range(25))
        )
    await store.change_session(
        session_id,
        finish_turn("live", record["epoch"], user_message=user("q"), answer=answer("a", "m1")),
    )
    final = await store.load_session(session_id)
    assert final is not None and final["messages"] == [user("q"), answer("a", "m1")]


# --------------------------------------------------------------------------- outcome ledger
async def test_a_retried_outcome_counts_once_and_a_reused_request_id_overwrites_nothing(
    make_store,
):
    store = make_store()
    assert await store.open_request("rec-1", "req-1", "replica-a") == "req-1"
    await store.record_outcome("rec-1", "req-1", "success")
    await store.record_outcome("rec-1", "req-1", "success")  # the same write, retried
    assert await store.open_request("rec-2", "req-2", "replica-a") == "req-2"
    # Another client sends the same id, while the first is open and after it is decided.
    reused_open = await store.open_request("rec-3", "req-2", "replica-b")
    await store.record_outcome("rec-2", "req-2", "client_disconnected_while_streaming")
    await store.record_outcome("rec-3", reused_open, "success")
    reused_done = await store.open_request("rec-4", "req-1", "replica-b")
    await store.record_outcome("rec-4", reused_done, "success")
    assert reused_open.startswith("req-2~") and reused_done.startswith("req-1~")
    totals = await store.outcome_totals()
    assert totals["outcomes"] == {
        "success": 3,
        "client_disconnected_while_streaming": 1,
        "client_disconnected_before_streaming": 0,
        "unknown_error_occurred": 0,
    }
    assert totals["admitted"] == 4 and totals["open"] == 0
    assert totals["repeated_request_ids"] == 2
    ledger = await store.outcome_ledger(["req-1", "req-2", reused_open, reused_done, "none"])
    assert ledger["outcomes"] == {
        "req-1": "success",
        "req-2": "client_disconnected_while_streaming",  # not overwritten by the other client
        reused_open: "success",
        reused_done: "success",
    }
    with pytest.raises(ValueError):
        await store.record_outcome("rec-4", "req-4", "sort_of_worked")


async def test_the_ledger_is_bounded_and_keeps_the_newest(make_store):
    store = make_store(ledger_size=5)
    for index in range(40):
        await store.record_outcome(f"rec-{index}", f"req-{index}", "success")
        await store.record_rejection(f"rej-{index}", "too_many_requests")
    ledger = await store.outcome_ledger(None)
    kept = newest_per_shard(store, [f"req-{i}" for i in range(40)], 5)
    assert ledger["outcomes"] == dict.fromkeys(kept, "success")
    kept = newest_per_shard(store, [f"rej-{i}" for i in range(40)], 5)
    assert ledger["rejections"] == dict.fromkeys(kept, "too_many_requests")
    assert "req-39" in ledger["outcomes"] and len(ledger["outcomes"]) < 32
    totals = await store.outcome_totals()  # the totals count everything
    assert totals["outcomes"]["success"] == 40
    assert totals["rejections"] == {"too_many_requests": 40}


async def test_concurrent_outcomes_are_all_counted(make_store):
    store = make_store()
    await asyncio.gather(
        *(store.record_outcome(f"rec-{i}", f"req-{i}", "success") for i in range(50)),
        *(store.record_rejection(f"rej-{i}", "invalid_json") for i in range(50)),
    )
    totals = await store.outcome_totals()
    assert totals["outcomes"]["success"] == 50
    assert totals["rejections"] == {"invalid_json": 50}


# --------------------------------------------------------------------------- load board
async def test_a_stale_load_report_is_ignored(make_store):
    store = make_store()
    later = time.time() + 60
    await store.report_load("replica-a", 2, 1, 0, later)
    await store.report_load("replica-a", 1, 5, 5, later)  # sent before, arrived after
    await store.report_load("replica-a", 2, 7, 7, later)  # a duplicate of seq 2
    await store.report_load("replica-b", 1, 2, 3, later)
    assert await store.load() == {"ongoing": 3, "queued": 3}
    await store.report_load("replica-b", 2, 0, 0, later)
    assert await store.load() == {"ongoing": 1, "queued": 0}


async def test_expired_load_reports_drop_out(make_store):
    store = make_store()
    now = time.time()
    await store.report_load("replica-dead", 1, 4, 4, now - 1)
    await store.report_load("replica-dying", 1, 2, 2, now + 2.0)
    await store.report_load("replica-live", 1, 1, 1, now + 60)
    assert await store.load() == {"ongoing": 3, "queued": 3}
    await asyncio.sleep(max(0.0, now + 2.2 - time.time()))
    assert await store.load() == {"ongoing": 1, "queued": 1}
    # A replica that comes back reports again and counts again.
    await store.report_load("replica-dying", 2, 1, 0, time.time() + 60)
    assert await store.load() == {"ongoing": 2, "queued": 1}


async def test_expiring_old_reports_never_deletes_a_fresh_one(redis_server):
    store = RedisStore(StoreSettings(namespace=new_id("ns")), redis_server.url)
    try:
        await store.report_load("replica-a", 1, 0, 0, time.time() - 1)  # expired
        real_drop = store._drop_expired

        async def drop_after_a_fresh_report(**kwargs):
            # Another replica's heartbeat lands between the read and the delete.
            await store.report_load("replica-a", 2, 1, 0, time.time() + 60)
            return await real_drop(**kwargs)

        store._drop_expired = drop_after_a_fresh_report
        await store.load()
        store._drop_expired = real_drop
        assert await store.load() == {"ongoing": 1, "queued": 0}
    finally:
        await store.close()


# --------------------------------------------------------------------------- Redis: signing key
async def test_redis_generates_one_signing_key_per_app_and_keeps_it(own_redis):
    namespace = new_id("ns")
    first = RedisStore(StoreSettings(namespace=namespace), own_redis.url)
    second = RedisStore(StoreSettings(namespace=namespace), own_redis.url)
    other_app = RedisStore(StoreSettings(namespace=new_id("ns")), own_redis.url)
    configured = RedisStore(
        StoreSettings(namespace=namespace, signing_key="from-env"), own_redis.url
    )
    stores = [first, second, other_app, configured]
    try:
        keys = await asyncio.gather(first.signing_key(), second.signing_key())
        assert keys[0] == keys[1] and len(keys[0]) >= 32
        assert await other_app.signing_key() != keys[0]
        assert await configured.signing_key() == "from-env"
        own_redis.restart()  # durable: a restart of Redis itself keeps the key
        after = RedisStore(StoreSettings(namespace=namespace), own_redis.url)
        stores.append(after)
        assert await after.signing_key() == keys[0]
    finally:
        for store in stores:
            await store.close()


async def test_memory_store_keeps_its_key_or_uses_the_configured_one():
    store = MemoryStore(StoreSettings(namespace="m"))
    assert await store.signing_key() == await store.signing_key()
    configured = MemoryStore(StoreSettings(namespace="m", signing_key="from-env"))
    assert await configured.signing_key() == "from-env"


# --------------------------------------------------------------------------- Redis down and back
def every_call(store: StateStore, session_id: str) -> dict[str, Callable]:
    later = time.time() + 60
    return {
        "load_session": lambda: store.load_session(session_id),
        "change_session": lambda: store.change_session(session_id, set_params({"top_k": 9})),
        "begin_turn": lambda: store.change_session(
            session_id, begin_turn(new_id("t"), time.time(), LEASE)
        ),
        "signing_key": store.signing_key,
        "record_outcome": lambda: store.record_outcome(new_id("rec"), new_id("req"), "success"),
        "record_rejection": lambda: store.record_rejection(new_id("req"), "invalid_json"),
        "outcome_totals": store.outcome_totals,
        "outcome_ledger": lambda: store.outcome_ledger(None),
        "outcome_ledger_ids": lambda: store.outcome_ledger(["req-x"]),
        "report_load": lambda: store.report_load("replica-a", 99, 1, 1, later),
        "load": store.load,
    }


async def assert_every_call_is_unavailable(store: StateStore, session_id: str) -> None:
    async def outcome(call) -> str:
        try:
            await asyncio.wait_for(call(), HANG_GUARD_S)
        except StoreUnavailable:
            return "StoreUnavailable"
        except TimeoutError:
            return "hang"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "answered"

    calls = every_call(store, session_id)
    results = await asyncio.gather(*(outcome(call) for call in calls.values()))
    assert dict(zip(calls, results, strict=True)) == dict.fromkeys(calls, "StoreUnavailable")


async def assert_every_call_works(store: StateStore, session_id: str) -> None:
    for name, call in every_call(store, session_id).items():
        if name == "begin_turn":
            continue  # the session's turn may be held
        await asyncio.wait_for(call(), HANG_GUARD_S)


@pytest.mark.parametrize("how", ["stopped", "killed", "frozen"])
async def test_redis_down_means_store_unavailable_and_back_means_working(own_redis, how):
    """While Redis is down (stopped, crashed or hung) every call raises StoreUnavailable
    (no hang); once it is back, the same store object works again, with the data kept."""
    store = RedisStore(StoreSettings(namespace=new_id("ns")), own_redis.url)
    fresh = RedisStore(StoreSettings(namespace=new_id("ns")), own_redis.url)  # no key cached
    session_id = new_id()
    try:
        await with_history(store, session_id, 1)
        await store.record_outcome("rec-before", "req-before", "success")
        if how == "frozen":
            with own_redis.frozen():
                await assert_every_call_is_unavailable(store, session_id)
                await assert_every_call_is_unavailable(fresh, session_id)
        else:
            own_redis.stop(hard=how == "killed")
            await assert_every_call_is_unavailable(store, session_id)
            await assert_every_call_is_unavailable(fresh, session_id)
            own_redis.start()

        await assert_every_call_works(store, session_id)
        await assert_every_call_works(fresh, session_id)
        record = await store.load_session(session_id)
        assert [m["content"] for m in record["messages"]] == ["q0", "a0"]
        assert record["params"] == {"top_k": 9}
        assert (await store.outcome_ledger(["req-before"]))["outcomes"] == {"req-before": "success"}
        await store.record_outcome("rec-before", "req-before", "success")  # still counted once
        # rec-before and every_call's one; a write sent to a frozen Redis may land once it
        # thaws (the client gave up waiting for the answer, not the command)
        counted = (await store.outcome_totals())["outcomes"]["success"]
        assert counted in ((2, 3) if how == "frozen" else (2,))
    finally:
        await store.close()
        await fresh.close()


async def test_redis_keys_stay_under_the_app_prefix_and_sessions_expire(redis_server):
    namespace = new_id("ns")
    store = RedisStore(StoreSettings(namespace=namespace, session_ttl_sec=300), redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        session_id = new_id()
        await with_history(store, session_id, 1)
        await store.record_outcome("rec", "req", "success")
        await store.report_load("replica-a", 1, 0, 0, time.time() + 60)
        keys = [key async for key in raw.scan_iter("*")]
        # chatstream:{<app>}:... and chatstream:{<app>|<shard>}:... (hash tags: one slot each)
        prefixes = (f"chatstream:{{{namespace}}}:", f"chatstream:{{{namespace}|")
        mine = [key for key in keys if key.startswith(prefixes)]
        assert mine and not [k for k in keys if namespace in k and k not in mine]
        ttl = await raw.pttl(f"chatstream:{{{namespace}|s0}}:s:{session_id}")
        assert 0 < ttl <= 300_000
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.parametrize(
    "make_store",
    ["memory", "redis", "cluster"],
    indirect=True,
)
async def test_a_loaded_record_is_a_snapshot(make_store):
    store = make_store()
    session_id = new_id()
    changed = await with_history(store, session_id, 1)
    loaded = await store.load_session(session_id)
    loaded["messages"].append(user("sneaked in"))
    changed["params"]["top_k"] = 1
    record = await store.load_session(session_id)
    assert [m["content"] for m in record["messages"]] == ["q0", "a0"]
    assert record["params"] == {}


# --------------------------------------------------------------------------- the Ray actor store
@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray cluster in this process (never an existing one)."""
    import ray

    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


async def calls_while_the_actor_restarts(ray, store, namespace: str, session_id: str) -> list[str]:
    """Kill the store's actor (restart allowed, as a node loss would) and call the store until
    it answered five times in a row; returns what each call raised ("" for an answer)."""
    from serve_app.stores.ray_actor import STATE_NAMESPACE

    actor = ray.get_actor(f"chatstream-state-{namespace}", namespace=STATE_NAMESPACE)
    ray.kill(actor, no_restart=False)
    seen: list[str] = []
    while len(seen) < 200 and seen[-5:] != [""] * 5:
        try:
            await asyncio.wait_for(store.load_session(session_id), HANG_GUARD_S)
            seen.append("")
        except StoreUnavailable:
            seen.append("StoreUnavailable")
        except Exception as exc:
            seen.append(type(exc).__name__)
        await asyncio.sleep(0.05)
    return seen


def ray_store(namespace: str) -> StateStore:
    from serve_app.stores.ray_actor import RayStore

    return RayStore(StoreSettings(namespace=namespace))


async def test_ray_store_keeps_its_state_across_an_actor_restart(local_ray):
    namespace, session_id = new_id("ns"), new_id()
    store = ray_store(namespace)
    await with_history(store, session_id, 1)
    await store.record_outcome("rec-1", "req-1", "success")
    key = await store.signing_key()
    await calls_while_the_actor_restarts(local_ray, store, namespace, session_id)
    record = await store.load_session(session_id)
    assert record is not None and [m["content"] for m in record["messages"]] == ["q0", "a0"]
    assert (await store.outcome_totals())["outcomes"]["success"] == 1
    assert await store.signing_key() == key
    await store.record_outcome("rec-1", "req-1", "success")  # a retry after the restart
    assert (await store.outcome_totals())["outcomes"]["success"] == 1


async def test_ray_store_restarting_means_store_unavailable(local_ray):
    namespace, session_id = new_id("ns"), new_id()
    store = ray_store(namespace)
    await with_history(store, session_id, 1)
    seen = await calls_while_the_actor_restarts(local_ray, store, namespace, session_id)
    assert set(seen) <= {"", "StoreUnavailable"}, seen
