"""The policy server over real HTTP (Uvicorn on loopback) with a real Redis for announcements:
authenticated atomic publish, rejected bad uploads, verified and resumable downloads."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import redis
import torch
import uvicorn

from efficientrollout.models import read_state_dict
from efficientrollout.policies import (
    PolicyClient,
    PolicyError,
    PolicyPublisher,
    PolicyStore,
)
from efficientrollout.policies.server import create_app
from efficientrollout.queue import RedisServer


@pytest.fixture()
def policy_server(tmp_path):
    with RedisServer(tmp_path / "redis") as rs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = PolicyStore(tmp_path / "store")
        server = uvicorn.Server(uvicorn.Config(create_app(store, "s3cret", rs.url), host="127.0.0.1", port=port, log_level="warning"))
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
    client = PolicyClient(url)
    assert client.latest() == 2
    path = client.download(2, tmp_path / "dl")
    assert read_state_dict(path)["a"].tolist() == state["a"].tolist()
    assert int(redis.Redis.from_url(redis_url).get("er:policy:latest")) == 2


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


def test_download_resumes_a_partial_file(policy_server, tmp_path):
    url, store, _ = policy_server
    PolicyPublisher(url, "s3cret").publish({"w": torch.randn(1000)})
    full = store.path(1).read_bytes()
    part = httpx.get(f"{url}/v1/versions/1/files/model.safetensors", headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == full[1000:]  # the server resumes
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "v1.model.safetensors").write_bytes(full[:1000])  # a download cut short
    path = PolicyClient(url).download(1, dest)
    assert path.read_bytes() == full
