"""The policy server: an HTTP front for PolicyStore (Starlette, served by Uvicorn).

GET  /v1/latest                          → {"version": N | null}
GET  /v1/versions/{v}/manifest           → the version's manifest (sha256 per file)
GET  /v1/versions/{v}/files/{name}       → the file; HTTP Range supported, so downloads resume
GET  /v1/auth                             → 200 if the bearer token is right, else 401 (a
                                           publisher checks before sending gigabytes)
POST /v1/versions[?version=N]            → publish (Authorization: Bearer <token>; body: a
                                           safetensors file; optional X-Sha256 header)
Uploads stream to a temporary file, are verified, then become visible atomically. Each new
version is announced on Redis (`<prefix>:policy:latest` key and pub/sub channel) if configured.
"""

from __future__ import annotations

import hashlib
import hmac
import tempfile
from pathlib import Path

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .store import PolicyError, PolicyStore


class _BigChunkFileResponse(FileResponse):
    chunk_size = 4 << 20  # Starlette's 64 KiB chunks cap loopback downloads at ~250 MB/s here


def create_app(store: PolicyStore, token: str, redis_url: str | None = None, prefix: str = "er") -> Starlette:
    if not token:
        raise ValueError("the policy server needs a publish token")

    async def latest(_: Request) -> Response:
        return JSONResponse({"version": store.latest()})

    async def manifest(request: Request) -> Response:
        try:
            return Response(msgspec.json.encode(store.manifest(int(request.path_params["version"]))), media_type="application/json")
        except PolicyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)

    async def file(request: Request) -> Response:
        try:
            path = store.path(int(request.path_params["version"]), request.path_params["name"])
        except PolicyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return _BigChunkFileResponse(path, media_type="application/octet-stream")

    def unauthorized(request: Request) -> Response | None:
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {token}".encode()):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        return None

    async def check_token(request: Request) -> Response:
        return unauthorized(request) or JSONResponse({"ok": True})

    async def publish(request: Request) -> Response:
        if denied := unauthorized(request):
            return denied
        version = request.query_params.get("version")
        with tempfile.TemporaryDirectory(dir=store.root, prefix=".upload.") as tmp:
            upload = Path(tmp) / "upload.safetensors"
            digest = hashlib.sha256()  # hashed as it arrives: one pass over the bytes, not two
            with open(upload, "wb") as f:
                async for chunk in request.stream():
                    digest.update(chunk)
                    f.write(chunk)
            try:
                stored = store.publish_file(upload, int(version) if version else None, request.headers.get("x-sha256"),
                                            digest=digest.hexdigest(), move=True)
            except (PolicyError, ValueError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        if redis_url:
            import redis.asyncio as aioredis

            client = aioredis.from_url(redis_url)
            try:
                await client.set(f"{prefix}:policy:latest", stored)
                await client.publish(f"{prefix}:policy", stored)
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
