"""Rollouts: the list, a form to create one from a stored bundle, and one rollout's
waves and devices with the operator's actions (the API's functions, with audit)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from agent.protocol import format_validation_error

from ..api.bundles import list_bundles
from ..api.deps import Ctx
from ..api.rollouts import ACTIONS, RolloutRequest, act, create, get_rollout, list_rollouts
from ..auth import Actor
from ..rollouts import ENDED, HALTED, PAUSED, RUNNING, STATES, WAITING_APPROVAL
from .auth import PageActor, PageOperator
from .render import not_found, render

router = APIRouter()

# The new-rollout form's shadow choice -> RolloutRequest.shadow ("": each device's config).
SHADOW_CHOICES: dict[str, bool | None] = {"": None, "on": True, "off": False}

# Which actions each rollout state allows (as fleet.server.rollouts checks them).
ALLOWED = {
    "approve": {WAITING_APPROVAL},
    "pause": {RUNNING, WAITING_APPROVAL},
    "resume": {PAUSED, HALTED},
    "abort": set(STATES) - ENDED,
}


def _list_data(ctx: Ctx, actor: Actor, state: str | None) -> dict[str, Any]:
    state = state if state in STATES else None
    listed = list_rollouts(ctx, actor, state, None, 100, 0)
    query = urlencode({"state": state}) if state else ""
    return {
        "state": state,
        "states": STATES,
        "rollouts": listed["rollouts"],
        "total": listed["total"],
        "fragment_url": "/ui/fragments/rollouts?" + query,
    }


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(
    request: Request, ctx: Ctx, actor: PageActor, state: str | None = None
) -> HTMLResponse:
    return render(request, "rollouts.html", actor, **_list_data(ctx, actor, state))


@router.get("/ui/fragments/rollouts", response_class=HTMLResponse)
def rollouts_fragment(
    request: Request, ctx: Ctx, actor: PageActor, state: str | None = None
) -> HTMLResponse:
    return render(request, "fragments/rollouts.html", actor, **_list_data(ctx, actor, state))


def _new_form(
    request: Request, ctx: Ctx, actor: Actor, form: dict[str, str], error: str | None = None
) -> HTMLResponse:
    bundles = list_bundles(ctx, actor)
    return render(
        request,
        "rollout_new.html",
        actor,
        status_code=422 if error else 200,
        bundles=bundles,
        form=form,
        error=error,
    )


@router.get("/rollouts/new", response_class=HTMLResponse)
def new_rollout_page(request: Request, ctx: Ctx, actor: PageOperator) -> HTMLResponse:
    return _new_form(request, ctx, actor, {"target_kind": "group", "waves": "1"})


@router.post("/rollouts/new")
def new_rollout(
    request: Request,
    ctx: Ctx,
    actor: PageOperator,
    bundle: Annotated[str, Form(max_length=300)] = "",
    target_kind: Annotated[str, Form(max_length=16)] = "group",
    target: Annotated[str, Form(max_length=128)] = "",
    canary: Annotated[str, Form(max_length=16)] = "",
    waves: Annotated[str, Form(max_length=8)] = "1",
    max_failures: Annotated[str, Form(max_length=8)] = "0",
    approval: Annotated[str, Form(max_length=8)] = "",
    shadow: Annotated[str, Form(max_length=8)] = "",
    min_agreement: Annotated[str, Form(max_length=16)] = "",
) -> Response:
    form = {
        "bundle": bundle,
        "target_kind": target_kind,
        "target": target,
        "canary": canary,
        "waves": waves,
        "max_failures": max_failures,
        "approval": approval,
        "shadow": shadow,
        "min_agreement": min_agreement,
    }
    name, sep, version = bundle.partition(":")
    if not sep:
        return _new_form(request, ctx, actor, form, "bundle: choose a stored bundle")
    if target_kind not in ("group", "device"):
        return _new_form(request, ctx, actor, form, "target_kind: group or device")
    if shadow not in SHADOW_CHOICES:
        return _new_form(request, ctx, actor, form, "shadow: on, off or the devices' config")
    try:
        body = RolloutRequest(
            model=name,
            version=version,
            canary=canary.strip() or None,
            waves=waves.strip() or 1,
            max_failures=max_failures.strip() or 0,
            approval=bool(approval),
            shadow=SHADOW_CHOICES[shadow],
            min_agreement=min_agreement.strip() or None,
            **{target_kind: target.strip()},
        )
        created = create(ctx, actor, body)
    except ValidationError as err:
        return _new_form(request, ctx, actor, form, format_validation_error(err))
    except HTTPException as exc:
        return _new_form(request, ctx, actor, form, str(exc.detail))
    return RedirectResponse(f"/rollouts/{created['id']}", status.HTTP_303_SEE_OTHER)


def _one_data(ctx: Ctx, actor: Actor, rollout_id: str) -> dict[str, Any]:
    rollout = get_rollout(rollout_id, ctx, actor)
    waves = []
    for wave in rollout["waves"]:
        total = sum(wave["counts"].values())
        waves.append({**wave, "total": total, "done": wave["counts"].get("done", 0)})
    allowed = [a for a in ACTIONS if rollout["state"] in ALLOWED[a]]
    return {"rollout": rollout, "waves": waves, "allowed": allowed}


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(rollout_id: str, request: Request, ctx: Ctx, actor: PageActor) -> HTMLResponse:
    try:
        data = _one_data(ctx, actor, rollout_id)
    except HTTPException as exc:
        return not_found(request, actor, exc)
    return render(request, "rollout.html", actor, **data)


@router.get("/ui/fragments/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_fragment(rollout_id: str, request: Request, ctx: Ctx, actor: PageActor) -> HTMLResponse:
    return render(request, "fragments/rollout.html", actor, **_one_data(ctx, actor, rollout_id))


@router.post("/ui/rollouts/{rollout_id}/{action}", response_class=HTMLResponse)
def rollout_action(
    rollout_id: str, action: str, request: Request, ctx: Ctx, actor: PageOperator
) -> HTMLResponse:
    if action not in ACTIONS:
        raise HTTPException(404, f"no rollout action {action[:20]!r}")
    error = None
    try:
        act(ctx, actor, rollout_id, action)
    except HTTPException as exc:
        error = str(exc.detail)
    data = _one_data(ctx, actor, rollout_id)
    return render(request, "fragments/rollout.html", actor, error=error, **data)
