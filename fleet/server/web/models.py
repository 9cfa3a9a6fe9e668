"""Stored bundles with their manifests and where each version runs, and the upload
form (the API's upload path: streamed, size-limited, signature checked)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select

from ..api.bundles import accept_upload
from ..api.deps import Ctx
from ..auth import Actor
from ..db.schema import BundleRecord, DeviceModel
from .auth import PageActor, PageOperator
from .render import render

router = APIRouter()


def _bundles(ctx: Ctx) -> list[dict[str, Any]]:
    with ctx.database.session() as s:
        running: dict[tuple[str, str | None], int] = {
            (m, v): int(n)
            for m, v, n in s.execute(
                select(DeviceModel.model, DeviceModel.active, func.count())
                .where(DeviceModel.active.is_not(None))
                .group_by(DeviceModel.model, DeviceModel.active)
            )
        }
        records = s.scalars(
            select(BundleRecord).order_by(BundleRecord.name, BundleRecord.uploaded_at.desc())
        ).all()
        return [
            {
                "name": r.name,
                "version": r.version,
                "sha256": r.sha256,
                "size": r.size,
                "signer": r.signer,
                "uploaded_at": r.uploaded_at,
                "uploaded_by": r.uploaded_by,
                "manifest": r.manifest,
                "health": health_summary(r.manifest),
                "running": running.get((r.name, r.version), 0),
            }
            for r in records
        ]


def health_summary(manifest: dict[str, Any]) -> list[str]:
    """The manifest's model-health blocks in a few words each: the golden samples' base64
    (tens of KB) and the reference histograms stay out of the page."""
    lines = []
    reference = manifest.get("reference")
    if isinstance(reference, dict):
        kind = next((k for k in ("classify", "detect", "raw") if reference.get(k)), "?")
        lines.append(f"reference: {kind}, {reference.get('samples', '?')} samples")
    golden = manifest.get("golden")
    if isinstance(golden, dict):
        samples = golden.get("samples")
        count = len(samples) if isinstance(samples, list) else "?"
        steps = golden.get("tolerance_steps")
        tolerance = f", ±{steps:g} steps" if isinstance(steps, int | float) else ""
        lines.append(f"golden: {count} samples{tolerance}")
    return lines


def _page(
    request: Request, ctx: Ctx, actor: Actor, error: str | None = None, code: int = 200
) -> HTMLResponse:
    return render(
        request, "models.html", actor, status_code=code, bundles=_bundles(ctx), error=error
    )


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, ctx: Ctx, actor: PageActor) -> HTMLResponse:
    return _page(request, ctx, actor)


@router.post("/models")
async def upload(request: Request, ctx: Ctx, actor: PageOperator) -> Response:
    try:
        await accept_upload(request, ctx, actor)
    except HTTPException as exc:
        return _page(request, ctx, actor, str(exc.detail), exc.status_code)
    return RedirectResponse("/models", status.HTTP_303_SEE_OTHER)
