"""Bundles: upload (checked in the order size, parse, signature, sha256), list, get.

A bundle is stored under its model file's sha256; its record keeps the manifest
and signature as uploaded, which is what deploys send. The same name and version
uploaded again is idempotent when the model file is the same, and a conflict
otherwise: a version names one model file, forever.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from agent.models.manifest import BundleError, read_bundle

from ..artifacts import ArtifactError
from ..auth import Actor, audit
from ..context import ServerContext
from ..db.schema import BundleRecord, DeviceModel
from .deps import Ctx, Operator, Reader
from .upload import UploadError, receive_bundle

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["bundles"])


class BundleSummary(BaseModel):
    name: str
    version: str
    sha256: str
    size: int
    signer: str | None
    created_at: str
    uploaded_at: float
    uploaded_by: str


class BundleDetail(BundleSummary):
    manifest: dict[str, Any]
    signature: str | None
    # Devices whose active version of this model is each version: {version: count}.
    running: dict[str, int]


def _summary(r: BundleRecord) -> dict[str, Any]:
    return {
        "name": r.name,
        "version": r.version,
        "sha256": r.sha256,
        "size": r.size,
        "signer": r.signer,
        "created_at": r.created_at,
        "uploaded_at": r.uploaded_at,
        "uploaded_by": r.uploaded_by,
    }


@router.post(
    "/bundles",
    response_model=BundleSummary,
    status_code=201,
    responses={200: {"description": "the same bundle was stored already"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["manifest", "model"],
                        "properties": {
                            "manifest": {"type": "string", "format": "binary"},
                            "signature": {"type": "string", "format": "binary"},
                            "model": {"type": "string", "format": "binary"},
                        },
                    }
                }
            },
        }
    },
)
async def upload_bundle(request: Request, ctx: Ctx, actor: Operator) -> JSONResponse:
    status, body = await accept_upload(request, ctx, actor)
    return JSONResponse(body, status_code=status)


async def accept_upload(
    request: Request, ctx: ServerContext, actor: Actor
) -> tuple[int, dict[str, Any]]:
    """Receive, verify and store the bundle the request's form carries (the API's and the
    dashboard's): (HTTP status, summary); refusals are ``HTTPException``."""
    upload = ctx.store.incoming()
    try:
        await receive_bundle(
            request.headers.get("content-type", ""),
            request.headers.get("content-length"),
            request.stream(),
            upload,
            int(ctx.config.http.max_upload_mb * (1 << 20)),
        )
    except UploadError as exc:
        shutil.rmtree(upload, ignore_errors=True)
        raise HTTPException(exc.status, exc.detail) from None
    except BaseException:
        shutil.rmtree(upload, ignore_errors=True)
        raise
    # Hashing and fsyncing a model file of hundreds of MB is no work for the event loop.
    return await run_in_threadpool(store_bundle, ctx, upload, actor)


def store_bundle(ctx: ServerContext, upload: Path, actor: Actor) -> tuple[int, dict[str, Any]]:
    """Verify and keep the bundle in ``upload``, record it; (HTTP status, summary)."""
    try:
        try:
            bundle = read_bundle(upload)
        except BundleError as exc:
            raise HTTPException(422, f"bundle refused: {exc}") from None
        m = bundle.manifest
        with ctx.database.session() as s:
            known = _record(s, m.name, m.version)
            if known is not None:
                return _again(known, m.model.sha256)
        try:
            _stored, signer = ctx.store.add(
                upload, ctx.trusted_keys, require_signature=ctx.config.require_signature
            )
        except ArtifactError as exc:
            raise HTTPException(422, f"bundle refused: {exc}") from None
        record = BundleRecord(
            name=m.name,
            version=m.version,
            sha256=m.model.sha256,
            size=m.model.size,
            # The uploaded manifest, not the stored directory's: two bundles may share
            # one model file (and so one directory) with manifests of their own.
            manifest=bundle.manifest_data,
            signature=bundle.signature,
            signer=signer,
            created_at=str(m.created_at),
            uploaded_at=ctx.clock(),
            uploaded_by=actor.name,
        )
        try:
            with ctx.database.session() as s:
                s.add(record)
                audit(
                    s,
                    actor,
                    "bundle.upload",
                    f"{m.name}/{m.version}",
                    {"sha256": m.model.sha256, "size": m.model.size, "signer": signer},
                    now=record.uploaded_at,
                )
        except IntegrityError:
            # Another upload of the same name and version won the race.
            with ctx.database.session() as s:
                known = _record(s, m.name, m.version)
                orphan = (
                    known is not None
                    and s.scalar(
                        select(BundleRecord.id)
                        .where(BundleRecord.sha256 == m.model.sha256)
                        .limit(1)
                    )
                    is None
                )
            if known is None:
                raise
            if orphan:  # the file this upload stored is no bundle's
                shutil.rmtree(ctx.store.bundle_dir(m.model.sha256), ignore_errors=True)
            return _again(known, m.model.sha256)
        log.info("bundle %s %s stored (%s) by %s", m.name, m.version, m.model.sha256, actor.name)
        return 201, _summary(record)
    finally:
        shutil.rmtree(upload, ignore_errors=True)


def _record(s: Any, name: str, version: str) -> BundleRecord | None:
    found: BundleRecord | None = s.scalar(
        select(BundleRecord).where(BundleRecord.name == name, BundleRecord.version == version)
    )
    return found


def _again(known: BundleRecord, sha256: str) -> tuple[int, dict[str, Any]]:
    if known.sha256 != sha256:
        raise HTTPException(
            409,
            f"{known.name} {known.version} exists with another model file "
            f"(sha256 {known.sha256[:12]}…): give the new one a new version",
        )
    return 200, _summary(known)


@router.get("/bundles", response_model=list[BundleSummary])
def list_bundles(
    ctx: Ctx, _actor: Reader, name: Annotated[str | None, Query(max_length=128)] = None
) -> list[dict[str, Any]]:
    query = select(BundleRecord).order_by(BundleRecord.name, BundleRecord.uploaded_at.desc())
    if name is not None:
        query = query.where(BundleRecord.name == name)
    with ctx.database.session() as s:
        return [_summary(r) for r in s.scalars(query)]


@router.get("/bundles/{name}/{version}", response_model=BundleDetail)
def get_bundle(name: str, version: str, ctx: Ctx, _actor: Reader) -> dict[str, Any]:
    with ctx.database.session() as s:
        r = _record(s, name, version)
        if r is None:
            raise HTTPException(404, f"no bundle {name[:80]!r} version {version[:80]!r}")
        running = s.execute(
            select(DeviceModel.active, func.count())
            .where(DeviceModel.model == name, DeviceModel.active.is_not(None))
            .group_by(DeviceModel.active)
        ).all()
    return {
        **_summary(r),
        "manifest": r.manifest,
        "signature": r.signature,
        "running": {str(v): n for v, n in running},
    }
