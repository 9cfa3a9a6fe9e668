"""Model files for devices: ``/artifacts/<sha256>/model.tflite``, with ``Range``.

No token: devices have none. The path is the file's content hash, and the signed
manifest in the deploy command protects its integrity (the device checks the
sha256 before installing). Only bundles recorded in the database are served, so a
directory left in the store by anything else is not.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse
from sqlalchemy import select

from ..artifacts import ArtifactError
from ..db.schema import BundleRecord
from .deps import Ctx

router = APIRouter(tags=["artifacts"])

PATH = "/artifacts/{sha256}/model.tflite"
RANGES: dict[int | str, dict[str, Any]] = {206: {"description": "the requested byte range"}}


@router.head(PATH, operation_id="head_artifact", response_class=FileResponse)
@router.get(PATH, operation_id="get_artifact", response_class=FileResponse, responses=RANGES)
def get_artifact(sha256: str, ctx: Ctx) -> FileResponse:
    try:
        path = ctx.store.model_path(sha256)
    except ArtifactError:
        raise HTTPException(404, "not a sha256") from None
    with ctx.database.session() as s:
        recorded = s.scalar(select(BundleRecord.id).where(BundleRecord.sha256 == sha256).limit(1))
    if recorded is None or not path.is_file():
        raise HTTPException(404, f"no model file with sha256 {sha256}")
    # Starlette answers Range (206 + Content-Range, 416 for a range past the end) and
    # HEAD; the file never changes under its hash, so it may be cached for good.
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )
