"""The policy server: an HTTP front for PolicyStore (Starlette, served by Uvicorn).

GET  /healthz, /v1/latest                → open: {"version": N | null}
GET  /v1/versions/{v}/manifest           → the version's manifest (sha256 per file)      [read]
GET  /v1/versions/{v}/files/{name}       → the file; HTTP Range supported, so downloads  [read]
                                           resume
POST /v1/versions[?version=N]            → publish (body: a safetensors file; optional   [publish]
                                           X-Sha256 header); 409 if that version exists
Sharded publish (large policies; each shard resumable on its own):
POST /v1/uploads                         → {"upload": id}: an upload session (a wrong    [publish]
                                           token is refused before any weight is sent)
PUT  /v1/uploads/{id}/{name}             → one shard, hashed as it arrives; with an      [publish]
                                           X-Sha256 header kept only if it matches; the
                                           answer gives its sha256 for the sender to check
GET  /v1/uploads/{id}                    → the shards received: {name: {size, sha256}}  [publish]
POST /v1/uploads/{id}/commit[?version=N] → body {"files": {name: sha256}}: all shards    [publish]
                                           present and matching → one atomic version
[read]: `Authorization: Bearer <read token or publish token>`; [publish]: the publish token.
Weights are a team's most valuable artefact: nothing about them leaves without a token, and a
refused request learns nothing but that it was refused (401).

Uploads stream to a temporary file, are verified, then become visible atomically. Each new
version is announced on Redis (`<prefix>:policy:latest` key and pub/sub channel) if configured.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import anyio.to_thread
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..queue.keys import RedisKeys
from .store import PolicyConflict, PolicyError, PolicyStore, valid_file_name

UPLOAD_TTL_S = 24 * 3600  # an abandoned upload session is removed after a day


class _BigChunkFileResponse(FileResponse):
    chunk_size = 4 << 20  # Starlette's 64 KiB chunks cap loopback downloads at ~250 MB/s here


def create_app(store: PolicyStore, token: str, redis_url: str | None = None, prefix: str = "er",
               read_token: str | None = None) -> Starlette:
    """`token` publishes (and reads); `read_token`, if given, only reads."""
    if not token:
        raise ValueError("the policy server needs a publish token")
    readers = [f"Bearer {t}".encode() for t in (token, read_token) if t]

    def refused(request: Request, allowed: list[bytes]) -> Response | None:
        auth = request.headers.get("authorization", "").encode()
        if not any(hmac.compare_digest(auth, a) for a in allowed):  # constant time, whichever matches
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        return None

    async def latest(_: Request) -> Response:
        return JSONResponse({"version": store.latest()})

    async def manifest(request: Request) -> Response:
        if denied := refused(request, readers):
            return denied
        try:
            return Response(msgspec.json.encode(store.manifest(int(request.path_params["version"]))), media_type="application/json")
        except PolicyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)

    async def file(request: Request) -> Response:
        if denied := refused(request, readers):
            return denied
        try:
            path = store.path(int(request.path_params["version"]), request.path_params["name"])
        except PolicyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return _BigChunkFileResponse(path, media_type="application/octet-stream")

    publishers = [f"Bearer {token}".encode()]
    uploads = store.root / ".uploads"

    async def receive(request: Request, dest: Path) -> str:
        """Stream the body to `dest`, hashing as it arrives (one pass over the bytes); its sha256."""
        digest = hashlib.sha256()
        with open(dest, "wb") as f:
            async for chunk in request.stream():
                digest.update(chunk)
                f.write(chunk)
        return digest.hexdigest()

    async def announce(version: int) -> None:
        if redis_url:
            import redis.asyncio as aioredis

            keys, client = RedisKeys(prefix), aioredis.from_url(redis_url)
            try:
                await client.set(keys.policy_latest, version)
                await client.publish(keys.policy_channel, version)
            finally:
                await client.aclose()

    def session(request: Request) -> Path | Response:
        """The request's upload session directory, or the response refusing the request."""
        if denied := refused(request, publishers):
            return denied
        upload = request.path_params["upload"]
        path = uploads / upload
        if re.fullmatch(r"[A-Za-z0-9_-]{16,64}", upload) and path.is_dir():
            return path
        return JSONResponse({"error": "no such upload session"}, status_code=404)

    def received(path: Path) -> dict[str, dict]:
        return {p.name: json.loads(p.with_suffix(".json").read_text()) for p in path.glob("*.safetensors")
                if p.with_suffix(".json").is_file()}

    async def begin_upload(request: Request) -> Response:
        if denied := refused(request, publishers):
            return denied
        uploads.mkdir(exist_ok=True)
        for old in uploads.iterdir():  # abandoned sessions
            if time.time() - old.stat().st_mtime > UPLOAD_TTL_S:
                shutil.rmtree(old, ignore_errors=True)
        upload = secrets.token_urlsafe(18)
        (uploads / upload).mkdir()
        return JSONResponse({"upload": upload})

    async def put_shard(request: Request) -> Response:
        path, name = session(request), request.path_params["name"]
        if isinstance(path, Response):
            return path
        if not valid_file_name(name):
            return JSONResponse({"error": f"{name!r} is not model.safetensors or a shard model-0000i-of-0000K.safetensors"},
                                status_code=400)
        expected = request.headers.get("x-sha256")  # optional: a streaming sender knows it only at the end
        part = path / f".{name}.{secrets.token_hex(6)}.part"  # its own: a retry may arrive while the first still runs
        try:
            digest = await receive(request, part)
            if expected and digest != expected:
                return JSONResponse({"error": f"{name}: checksum mismatch: got {digest}, expected {expected}"}, status_code=400)
            info = {"size": part.stat().st_size, "sha256": digest}
            # no await from here on: the shard and its record change together
            part.replace(path / name)
            (path / name).with_suffix(".json").write_text(json.dumps(info))
            return JSONResponse({"name": name, **info})
        finally:
            part.unlink(missing_ok=True)  # a cut or refused upload leaves nothing behind

    async def upload_status(request: Request) -> Response:
        path = session(request)
        if isinstance(path, Response):
            return path
        # "digest_first": false tells publishers they may stream a shard and learn its sha256 at
        # the end (servers before that required X-Sha256 with every shard; they do not say this)
        return JSONResponse({"files": received(path), "digest_first": False})

    async def commit(request: Request) -> Response:
        path = session(request)
        if isinstance(path, Response):
            return path
        try:
            wanted = dict(json.loads(await request.body())["files"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'the body must be {"files": {name: sha256}}'}, status_code=400)
        have = received(path)
        wrong = sorted(n for n, digest in wanted.items() if have.get(n, {}).get("sha256") != digest)
        if wrong or set(have) - set(wanted):
            return JSONResponse({"error": f"shards missing or not matching: {wrong}; not asked for: {sorted(set(have) - set(wanted))}"},
                                status_code=400)
        version = request.query_params.get("version")
        try:
            stored = await anyio.to_thread.run_sync(lambda: store.publish_files(
                {n: (path / n, d) for n, d in wanted.items()}, int(version) if version else None, move=True))
        except PolicyConflict as exc:  # another publish won that version: this upload can never land
            shutil.rmtree(path, ignore_errors=True)
            return JSONResponse({"error": str(exc)}, status_code=409)
        except (PolicyError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        shutil.rmtree(path, ignore_errors=True)
        await announce(stored)
        return JSONResponse({"version": stored})

    async def publish(request: Request) -> Response:
        if denied := refused(request, publishers):
            return denied
        version = request.query_params.get("version")
        with tempfile.TemporaryDirectory(dir=store.root, prefix=".upload.") as tmp:
            upload = Path(tmp) / "upload.safetensors"
            digest = await receive(request, upload)
            try:  # in a thread: downloads by other engines go on meanwhile
                stored = await anyio.to_thread.run_sync(lambda: store.publish_file(
                    upload, int(version) if version else None, request.headers.get("x-sha256"), digest=digest, move=True))
            except PolicyConflict as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
            except (PolicyError, ValueError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        await announce(stored)
        return JSONResponse({"version": stored})

    return Starlette(routes=[
        Route("/healthz", lambda _: JSONResponse({"ok": True})),
        Route("/v1/latest", latest),
        Route("/v1/versions/{version:int}/manifest", manifest),
        Route("/v1/versions/{version:int}/files/{name}", file),
        Route("/v1/versions", publish, methods=["POST"]),
        Route("/v1/uploads", begin_upload, methods=["POST"]),
        Route("/v1/uploads/{upload}", upload_status),
        Route("/v1/uploads/{upload}/commit", commit, methods=["POST"]),
        Route("/v1/uploads/{upload}/{name}", put_shard, methods=["PUT"]),
    ])

