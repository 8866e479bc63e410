"""The policy server: an HTTP front for PolicyStore (Starlette, served by Uvicorn).

GET  /healthz, /v1/latest                → open: {"version": N | null}
GET  /v1/versions/{v}/manifest           → the version's manifest (sha256 per file)      [read]
GET  /v1/versions/{v}/files/{name}       → the file; HTTP Range supported, so downloads  [read]
                                           resume
GET  /v1/auth                            → 200 if the publish token is right, else 401  [publish]
                                           (a publisher checks before sending gigabytes)
POST /v1/versions[?version=N]            → publish (body: a safetensors file; optional   [publish]
                                           X-Sha256 header); 409 if that version exists
[read]: `Authorization: Bearer <read token or publish token>`; [publish]: the publish token.
Weights are a team's most valuable artefact: nothing about them leaves without a token, and a
refused request learns nothing but that it was refused (401).

Uploads stream to a temporary file, are verified, then become visible atomically. Each new
version is announced on Redis (`<prefix>:policy:latest` key and pub/sub channel) if configured.
"""

from __future__ import annotations

import hashlib
import hmac
import tempfile
from pathlib import Path

import anyio.to_thread
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..queue.keys import RedisKeys
from .store import PolicyConflict, PolicyError, PolicyStore


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

    async def check_token(request: Request) -> Response:
        return refused(request, publishers) or JSONResponse({"ok": True})

    async def publish(request: Request) -> Response:
        if denied := refused(request, publishers):
            return denied
        version = request.query_params.get("version")
        with tempfile.TemporaryDirectory(dir=store.root, prefix=".upload.") as tmp:
            upload = Path(tmp) / "upload.safetensors"
            digest = hashlib.sha256()  # hashed as it arrives: one pass over the bytes, not two
            with open(upload, "wb") as f:
                async for chunk in request.stream():
                    digest.update(chunk)
                    f.write(chunk)
            try:  # in a thread: downloads by other engines go on meanwhile
                stored = await anyio.to_thread.run_sync(lambda: store.publish_file(
                    upload, int(version) if version else None, request.headers.get("x-sha256"), digest=digest.hexdigest(), move=True))
            except PolicyConflict as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
            except (PolicyError, ValueError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        if redis_url:
            import redis.asyncio as aioredis

            keys, client = RedisKeys(prefix), aioredis.from_url(redis_url)
            try:
                await client.set(keys.policy_latest, stored)
                await client.publish(keys.policy_channel, stored)
            finally:
                await client.aclose()
        return JSONResponse({"version": stored})

    return Starlette(routes=[
        Route("/healthz", lambda _: JSONResponse({"ok": True})),
        Route("/v1/latest", latest),
        Route("/v1/versions/{version:int}/manifest", manifest),
        Route("/v1/versions/{version:int}/files/{name}", file),
        Route("/v1/versions", publish, methods=["POST"]),
        Route("/v1/auth", check_token),
    ])
