"""The policy server over real HTTP (Uvicorn on loopback) with a real Redis for announcements:
authenticated atomic publish, rejected bad uploads, read-protected, verified and resumable
downloads, concurrent publishes that conflict cleanly, and client-side error classification
(transient 5xx and connection errors vs permanent 4xx) against real HTTP servers."""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch
import uvicorn

from efficientrollout.models import read_state_dict
from efficientrollout.policies import (
    FetchStopped,
    PolicyClient,
    PolicyConflict,
    PolicyError,
    PolicyPublisher,
    PolicyStore,
    PolicyUnavailable,
    WeightCache,
    default_cache_root,
)
from efficientrollout.policies.cache import cache_roots
from efficientrollout.policies.client import download_path
from efficientrollout.policies.server import create_app
from efficientrollout.policies.store import WEIGHTS_FILE, SafetensorsStream
from efficientrollout.queue import RedisKeys, RedisServer


@pytest.fixture()
def policy_server(tmp_path):
    with RedisServer(tmp_path / "redis") as rs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = PolicyStore(tmp_path / "store")
        app = create_app(store, "s3cret", rs.url, read_token="r3ad")
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", store, rs.url
        server.should_exit = True
        thread.join(timeout=10)


def test_publish_fetch_and_announce(policy_server, tmp_path):
    url, store, redis_url = policy_server
    state = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    assert PolicyPublisher(url, "s3cret").publish(state) == 1
    assert PolicyPublisher(url, "s3cret").publish(state) == 2
    client = PolicyClient(url, "r3ad")
    assert client.latest() == 2
    path = client.download(2, tmp_path / "dl")
    assert read_state_dict(path)["a"].tolist() == state["a"].tolist()
    assert int(redis.Redis.from_url(redis_url).get(RedisKeys().policy_latest)) == 2


def test_publish_in_the_engines_dtype_casts_floating_tensors_only(policy_server, tmp_path):
    url, _, _ = policy_server
    state = {"w": torch.randn(3, 5), "steps": torch.arange(4)}
    version = PolicyPublisher(url, "s3cret", dtype=torch.bfloat16).publish(state)
    got = read_state_dict(PolicyClient(url, "r3ad").download(version, tmp_path / "dl"))
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], state["w"].bfloat16())
    assert got["steps"].dtype == torch.int64 and torch.equal(got["steps"], state["steps"])


def test_unauthenticated_wrong_checksum_and_corrupt_uploads_store_nothing(policy_server, tmp_path):
    url, store, _ = policy_server
    PolicyPublisher(url, "s3cret").publish({"a": torch.ones(2)})
    with pytest.raises(PolicyError, match="401"):
        PolicyPublisher(url, "wrong").publish({"a": torch.zeros(2)})
    assert httpx.post(f"{url}/v1/versions", content=b"x").status_code == 401
    r = httpx.post(f"{url}/v1/versions", content=b"not safetensors", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]
    good = store.path(1).read_bytes()
    r = httpx.post(f"{url}/v1/versions", content=good, headers={"Authorization": "Bearer s3cret", "X-Sha256": "0" * 64})
    assert r.status_code == 400 and "checksum" in r.json()["error"]
    assert store.versions() == [1] and PolicyClient(url).latest() == 1


def _layers(n: int = 6) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.w": torch.randn(128, 256, generator=torch.Generator().manual_seed(i)) for i in range(n)}  # 128 KiB each


def test_a_large_policy_travels_in_verified_shards(policy_server, tmp_path):
    url, store, redis_url = policy_server
    state = _layers()
    publisher = PolicyPublisher(url, "s3cret", shard_bytes=300_000)  # two tensors per shard
    assert publisher.publish(state) == 1
    assert publisher.last_upload["shards"] == 3 and publisher.last_upload["sent"] == 3
    names = [f.name for f in store.manifest(1).files]
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    store.verify(1)
    got = read_state_dict(PolicyClient(url, "r3ad").download(1, tmp_path / "dl"))  # a directory of shards
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert int(redis.Redis.from_url(redis_url).get(RedisKeys().policy_latest)) == 1
    assert not any((store.root / ".uploads").iterdir())  # the session is gone once committed


def test_an_interrupted_publish_resumes_with_only_the_missing_shards(policy_server):
    from safetensors.torch import save

    url, store, _ = policy_server
    auth = {"Authorization": "Bearer s3cret"}
    state = _layers()
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    keys = list(state)
    # a publisher that died after its first shard (and one corrupt attempt at the second)
    upload = httpx.post(f"{url}/v1/uploads", headers=auth).json()["upload"]
    first = save({k: state[k] for k in keys[:2]})
    digest = hashlib.sha256(first).hexdigest()
    assert httpx.put(f"{url}/v1/uploads/{upload}/{names[0]}", content=first, headers={**auth, "X-Sha256": digest}).status_code == 200
    bad = httpx.put(f"{url}/v1/uploads/{upload}/{names[1]}", content=b"cut short", headers={**auth, "X-Sha256": digest})
    assert bad.status_code == 400 and "checksum" in bad.json()["error"]
    assert list(httpx.get(f"{url}/v1/uploads/{upload}", headers=auth).json()["files"]) == [names[0]]
    # without X-Sha256 (a streaming sender) a shard is kept and its digest returned; the commit checks
    # it (and the resume below replaces this one, which is not the publisher's second shard)
    second = save({"other": torch.ones(3)})
    r = httpx.put(f"{url}/v1/uploads/{upload}/{names[1]}", content=second, headers=auth)
    assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(second).hexdigest()
    r = httpx.post(f"{url}/v1/uploads/{upload}/commit", json={"files": {names[0]: digest, names[1]: digest}}, headers=auth)
    assert r.status_code == 400 and store.versions() == []
    # committing now is refused: a version is all of its shards or nothing
    r = httpx.post(f"{url}/v1/uploads/{upload}/commit", json={"files": {n: digest for n in names}}, headers=auth)
    assert r.status_code == 400 and store.versions() == []
    for name in ("../evil", "model-00004-of-00003.safetensors", "weights.bin"):
        assert httpx.put(f"{url}/v1/uploads/{upload}/{name}", content=b"x", headers={**auth, "X-Sha256": digest}).status_code >= 400
    assert httpx.post(f"{url}/v1/uploads").status_code == 401
    assert httpx.get(f"{url}/v1/uploads/{upload}", headers={"Authorization": "Bearer r3ad"}).status_code == 401
    publisher = PolicyPublisher(url, "s3cret", shard_bytes=300_000)
    assert publisher.publish(state, resume=upload) == 1
    assert publisher.last_upload == {"upload": upload, "shards": 3, "sent": 2, "skipped": 1}
    got = read_state_dict(store.root / "v1")
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_a_shard_goes_with_its_digest_up_front_to_servers_that_want_it(policy_server):
    """Servers from before streamed publishes required X-Sha256 with every shard and do not say
    "digest_first" in an upload's status; for them the publisher hashes each shard first and
    sends the digest with it, which the server checks (a wrong one is refused, nothing kept)."""
    url, _, _ = policy_server
    auth = {"Authorization": "Bearer s3cret"}
    publisher = PolicyPublisher(url, "s3cret")
    upload = httpx.post(f"{url}/v1/uploads", headers=auth).json()["upload"]
    assert httpx.get(f"{url}/v1/uploads/{upload}", headers=auth).json()["digest_first"] is False  # this server streams
    shard = SafetensorsStream(_layers(2))
    with pytest.raises(PolicyError, match="checksum mismatch"):
        publisher._put_shard(upload, "model.safetensors", shard, known="0" * 64)
    assert httpx.get(f"{url}/v1/uploads/{upload}", headers=auth).json()["files"] == {}
    assert publisher._put_shard(upload, "model.safetensors", shard, known=shard.sha256()) == shard.sha256()


def test_download_resumes_a_partial_file(policy_server, tmp_path):
    url, store, _ = policy_server
    PolicyPublisher(url, "s3cret").publish({"w": torch.randn(1000)})
    full = store.path(1).read_bytes()
    part = httpx.get(f"{url}/v1/versions/1/files/model.safetensors", headers={"Range": "bytes=1000-", "Authorization": "Bearer r3ad"})
    assert part.status_code == 206 and part.content == full[1000:]  # the server resumes
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "v1.model.safetensors").write_bytes(full[:1000])  # a download cut short
    path = PolicyClient(url, "r3ad").download(1, dest)
    assert path.read_bytes() == full


class CountingClient(PolicyClient):
    """A real client that counts the files it fetched from the server."""

    fetched = 0

    def _fetch(self, *args):
        CountingClient.fetched += 1
        return super()._fetch(*args)


def test_engines_on_one_host_download_a_version_once(policy_server, tmp_path):
    url, store, _ = policy_server
    publisher = PolicyPublisher(url, "s3cret")
    state = {"w": torch.randn(300_000)}
    publisher.publish(state)
    CountingClient.fetched = 0
    caches = [WeightCache(tmp_path / "cache") for _ in range(3)]
    got: list = [None] * 3

    def engine(i):
        got[i] = caches[i].fetch(CountingClient(url, "r3ad"), 1)

    threads = [threading.Thread(target=engine, args=(i,)) for i in range(3)]
    with open(tmp_path / "cache" / "lock", "a") as lock:  # all three ask while the cache is busy
        fcntl.flock(lock, fcntl.LOCK_EX)
        for t in threads:
            t.start()
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert CountingClient.fetched == 1 and sorted(fetched for _, fetched in got) == [False, False, True]
    assert len({path for path, _ in got}) == 1 and torch.equal(read_state_dict(got[0][0])["w"], state["w"])

    for v in (2, 3, 4):  # the two newest complete versions stay: an engine may still be loading the older
        publisher.publish({"w": state["w"] * v})
        caches[0].fetch(PolicyClient(url, "r3ad"), v)
    assert sorted(p.name for p in (tmp_path / "cache").glob("v*")) == [
        "v3.json", "v3.model.safetensors", "v4.json", "v4.model.safetensors"]
    # other weights under a cached number (a policy server restarted on an empty store): fetched again
    (tmp_path / "cache" / "v4.json").write_bytes(b'{"version":4,"created":0.0,"files":[]}')
    path, fetched = caches[1].fetch(PolicyClient(url, "r3ad"), 4)
    assert fetched and torch.equal(read_state_dict(path)["w"], state["w"] * 4)

    caches[0].close()
    caches[1].close()
    assert (tmp_path / "cache" / "v4.json").exists()  # one engine still uses the cache
    caches[2].close()
    assert not (tmp_path / "cache").exists()  # the last one removes it
    newcomer = WeightCache(tmp_path / "cache")
    assert newcomer.fetch(PolicyClient(url, "r3ad"), 4)[1]  # and a newcomer starts over
    newcomer.close()


def test_a_weight_cache_keeps_the_version_it_just_fetched_and_resumes_only_its_own_files(policy_server, tmp_path):
    url, store, _ = policy_server
    publisher = PolicyPublisher(url, "s3cret")
    state = {"w": torch.randn(1000)}
    publisher.publish(state)
    cache = WeightCache(tmp_path / "cache")
    for v in (10, 11):  # complete versions numbered higher, as a server before a restart left them
        (tmp_path / "cache" / f"v{v}.model.safetensors").write_bytes(b"old")
        (tmp_path / "cache" / f"v{v}.json").write_bytes(b"{}")
        time.sleep(0.01)
    path, fetched = cache.fetch(PolicyClient(url, "r3ad"), 1)
    assert fetched and path.exists() and torch.equal(read_state_dict(path)["w"], state["w"])
    assert sorted(p.name for p in (tmp_path / "cache").glob("v*")) == [  # v11 completed last before it
        "v1.json", "v1.model.safetensors", "v11.json", "v11.model.safetensors"]
    # a cut download of other weights numbered 2, in 3 shards, does not join version 2's 2 shards
    PolicyPublisher(url, "s3cret", shard_bytes=2500).publish({"a": torch.randn(500), "b": torch.randn(500)})
    names = [f.name for f in store.manifest(2).files]
    assert len(names) == 2
    (tmp_path / "cache" / "v2").mkdir()
    (tmp_path / "cache" / "v2" / "model-00003-of-00003.safetensors").write_bytes(b"stale")
    path, _ = cache.fetch(PolicyClient(url, "r3ad"), 2)
    assert sorted(p.name for p in path.iterdir()) == names
    cache.close()


def test_a_weight_cache_takes_a_manifest_the_engine_already_fetched(policy_server, tmp_path):
    """An engine reads the first new version's manifest to choose where its cache goes; the
    download then uses that manifest instead of asking the server again."""
    url, _, _ = policy_server
    state = {"w": torch.randn(1000)}
    PolicyPublisher(url, "s3cret").publish(state)
    client = PolicyClient(url, "r3ad")
    manifest = client.manifest(1)
    client.manifest = lambda version: pytest.fail(f"asked the server for version {version}'s manifest again")
    cache = WeightCache(tmp_path / "cache")
    path, fetched = cache.fetch(client, 1, manifest=manifest)
    assert fetched and torch.equal(read_state_dict(path)["w"], state["w"])
    cache.close()


def test_a_weight_cache_in_a_fresh_directory_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        cache = WeightCache(tmp_path / "made" / "here" / "cache")
    finally:
        os.umask(old)
    assert (tmp_path / "made" / "here").stat().st_mode & 0o777 == 0o700
    cache.close()


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm on this machine")
def test_the_default_weight_cache_is_in_memory_where_three_versions_fit():
    url = f"http://127.0.0.1:1/{os.getpid()}"  # a server nobody else caches for
    shm, tmp = cache_roots(url)
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    assert default_cache_root(url, version_bytes=free // 10) == shm
    assert default_cache_root(url, version_bytes=free // 2) == tmp  # three would not fit
    assert default_cache_root(url) == tmp  # size unknown
    cache = WeightCache(default_cache_root(url, version_bytes=1 << 20))
    try:  # engines already there: a newcomer joins them where one more version fits
        assert default_cache_root(url, version_bytes=free // 2) == shm
        assert default_cache_root(url, version_bytes=2 * free) == tmp
    finally:
        cache.close()
    assert not shm.exists()
    assert default_cache_root(url, "/somewhere") == Path("/somewhere") / shm.name


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_weight_cache_under_another_users_directory_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)  # not writable by us, but its owner could swap our cache for theirs
    with pytest.raises(PermissionError, match="only this user can change"):
        WeightCache(theirs / "cache")


def test_a_weight_cache_others_could_write_to_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant weights next to a matching manifest: they load unhashed
    with pytest.raises(PermissionError, match="only this user can change"):
        WeightCache(shared / "cache")
    shared.chmod(0o1777)  # sticky, as /tmp: others cannot replace what is ours
    WeightCache(shared / "cache").close()
    assert not (shared / "cache").exists()


def test_weights_and_manifests_need_a_read_token(policy_server, tmp_path):
    url, store, _ = policy_server
    PolicyPublisher(url, "s3cret").publish({"w": torch.randn(100)})
    secret_bytes, sha = store.path(1).read_bytes(), store.manifest(1).files[0].sha256
    for path in ("/v1/versions/1/manifest", "/v1/versions/1/files/model.safetensors", "/v1/versions/9/manifest",
                 "/v1/versions/1/files/other"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "r3ad"}, {"Authorization": "Bearer r3ad2"}):
            r = httpx.get(f"{url}{path}", headers=headers)
            # refused alike whether the version or file exists or not: nothing leaks, not even existence
            assert r.status_code == 401 and r.json() == {"error": "missing or wrong bearer token"}, (path, headers)
            assert sha not in r.text and secret_bytes[:64] not in r.content
    with pytest.raises(PolicyError, match="401"):
        PolicyClient(url).manifest(1)
    with pytest.raises(PolicyError, match="401"):
        PolicyClient(url, "wrong").download(1, tmp_path / "dl")
    assert not list((tmp_path / "dl").glob("*"))
    for token in ("r3ad", "s3cret"):  # the read token reads, and so does the publish token
        assert PolicyClient(url, token).download(1, tmp_path / token).read_bytes() == secret_bytes
    # the read token cannot publish; the open endpoints stay open
    with pytest.raises(PolicyError, match="401"):
        PolicyPublisher(url, "r3ad").publish({"w": torch.zeros(1)})
    assert httpx.get(f"{url}/v1/latest").json() == {"version": 1} and httpx.get(f"{url}/healthz").status_code == 200


def test_concurrent_publishes_of_one_version_conflict_cleanly(policy_server):
    url, store, _ = policy_server
    outcomes: list[object] = []

    def publish(value: float) -> None:
        try:
            outcomes.append(PolicyPublisher(url, "s3cret").publish({"w": torch.full((50_000,), value)}, version=5))
        except PolicyError as exc:
            outcomes.append(exc)

    for _ in range(3):
        outcomes.clear()
        threads = [threading.Thread(target=publish, args=(float(i),)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [o for o in outcomes if isinstance(o, Exception)]
        assert all("409" in str(e) for e in errors), errors  # a clear conflict, never a 500
        assert len(errors) >= 1 and store.versions() == [5]
    debris = [p for p in store.root.rglob(".*") if not (p.name == ".uploads" and p.is_dir())]
    assert not debris and not any((store.root / ".uploads").iterdir())  # no leftovers, not even the losers' shards
    r = httpx.post(f"{url}/v1/versions?version=5", content=store.path(5).read_bytes(), headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 409 and "not newer" in r.json()["error"]


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """A server (or proxy) in front of the policy store that answers every GET with one status."""

    status = 503

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.endswith("/manifest") and self.server.fail == "files":
            manifest = b'{"version": 1, "created": 0.0, "files": [{"name": "model.safetensors", "size": 10, "sha256": "00"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(manifest)))
            self.end_headers()
            self.wfile.write(manifest)
            return
        self.server.hits += 1
        self.send_response(self.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"no")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status, fail, expected", [
    (503, "manifest", PolicyUnavailable), (404, "manifest", PolicyError),
    (503, "files", PolicyUnavailable), (404, "files", PolicyError),
])
def test_http_errors_are_classified_by_status(tmp_path, status, fail, expected):
    handler = type("Handler", (_StatusHandler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.hits, server.fail = 0, fail
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = PolicyClient(f"http://127.0.0.1:{server.server_port}", "r3ad", retries=2)
        with pytest.raises(expected) as info:
            client.download(1, tmp_path / "dl")
        assert type(info.value) is expected  # 5xx is not a PolicyError (the engine would blacklist the version)
        if fail == "files":  # 4xx: asked once, not retried; 5xx: retried, then given up for this poll
            assert server.hits == (1 if status == 404 else 3)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(PolicyUnavailable):  # nobody listening any more
        PolicyClient(f"http://127.0.0.1:{server.server_port}", retries=0, timeout=5).manifest(1)


def test_an_engine_told_to_stop_mid_download_keeps_what_arrived_and_resumes(policy_server, tmp_path):
    """A 12 MB version (three 4 MiB chunks): stopped after the first chunk, the fetch ends with
    FetchStopped and a partial file; the next fetch resumes it and gets the published tensor."""
    url, _, _ = policy_server
    w = torch.randn(3_000_000)
    PolicyPublisher(url, "s3cret").publish({"w": w})
    cache, asked = WeightCache(tmp_path / "cache"), []
    with pytest.raises(FetchStopped, match="kept to resume"):
        cache.fetch(PolicyClient(url, "r3ad"), 1, lambda: asked.append(1) or len(asked) > 1)
    partial = download_path(cache.root, 1, [WEIGHTS_FILE])
    assert 0 < partial.stat().st_size < w.numel() * 4 and len(asked) == 2 and not cache.holds(1)
    path, fetched = cache.fetch(PolicyClient(url, "r3ad"), 1, lambda: False)
    assert fetched and cache.holds(1) and torch.equal(read_state_dict(path)["w"], w)
    cache.close()


def test_an_engine_told_to_stop_does_not_wait_out_another_engines_download(policy_server, tmp_path):
    url, _, _ = policy_server
    PolicyPublisher(url, "s3cret").publish({"w": torch.randn(1000)})
    cache, stop, outcome = WeightCache(tmp_path / "cache"), threading.Event(), []
    CountingClient.fetched = 0

    def engine():
        try:
            outcome.append(cache.fetch(CountingClient(url, "r3ad"), 1, stop.is_set))
        except FetchStopped as exc:
            outcome.append(exc)

    with open(tmp_path / "cache" / "lock", "a") as lock:  # another engine is downloading
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=engine)
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive()  # it waits for the lock ...
        stop.set()
        waiting.join(timeout=2)
        assert not waiting.is_alive()  # ... until told to stop, the lock still held
    assert isinstance(outcome[0], FetchStopped) and CountingClient.fetched == 0
    path, fetched = cache.fetch(CountingClient(url, "r3ad"), 1, lambda: False)  # a free lock is taken at once
    assert fetched and path.exists()
    cache.close()
