"""The model lifecycle: store -> validate -> swap -> probation -> last-known-good or rollback.

``ModelLifecycle`` is the model half of the command plane's ``CommandTarget``
(``deploy``, ``rollback``, ``model_states``). It reaches the inference workers only
through ``ModelServer`` (agent.models.serving), so ``agent.models`` never imports
``agent.loops``.

Decisions:
- Deploys and rollbacks of one model are serialised: a second one while one runs is
  refused with ``busy`` (the console retries), never queued behind a probation that
  may take minutes. Different models proceed in parallel.
- A version that fails validation is removed from the store again (unless it was
  already stored before this deploy); one that fails probation is kept, for a post-mortem.
- Between validation and the swap, a candidate for pipelines that serve a previous
  version runs beside it on live frames first (agent.models.shadow_stage); refused
  there (``shadow_rejected``), it is removed like a version that failed validation.
- Probation ends when ``duration_s`` has passed and every serving pipeline has made
  ``min_inferences``. A version that cannot reach that many within
  ``max(3 x duration_s, duration_s + 60 s)`` fails probation: a version nobody saw
  work is not trusted.
- A model no pipeline uses is still stored, validated and made active (a pipeline that
  names it in the config file serves it after a restart), but there is no probation:
  no frames reach it to judge. Its state says ``stored``, not ``serving``, and the
  reply's ``served: false`` says so too. Pipelines are fixed for the agent's life, so
  this cannot change without a restart.
- A manual rollback target is validated again (a child process) and, once serving,
  becomes last-known-good: the operator vouched for it.
- At start-up the active version must pass the sha256 check and validation; then the
  last-known-good one, then any other stored version, newest first. When none does,
  the pipelines run without that model and ``model_states`` says why.
- A version is on trial from its install until it passes probation, and the store
  records it. It becomes active before its swap, so a crash at any point after (a
  model that kills the process on real frames, a power cut) finds it active and on
  trial at the next start: it is marked failed (``probation_failed``, "agent
  restarted during probation") and last-known-good serves; it is never picked by
  start-up, rollback-after-probation or a rollback without a target again, so the
  device cannot crash-loop on it. A deploy that died before its swap is undone (the
  version is removed), so its retry is a plain deploy.
- A deploy only moves forward (``_refuse_downgrade``): a version stored here already,
  or one whose manifest is older than the active version's, is refused with
  ``downgrade``. Going back is the ``rollback`` command's job, so a replayed old
  signed deploy cannot take a device back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from agent.config import AgentConfig, ProbationConfig
from agent.models.manifest import (
    Manifest,
    ManifestError,
    input_shapes,
    load_public_key,
    parse_manifest,
)
from agent.models.serving import ModelServer, ServingStats, SwapDone
from agent.models.shadow_stage import ShadowRule, run_shadow, shadow_servers
from agent.models.store import (
    ModelRecord,
    ModelStore,
    StoredVersion,
    StoreError,
    check_component,
)
from agent.models.validate import (
    Requirements,
    ValidationFailed,
    ValidationReport,
    Validator,
    check_fit,
)
from agent.protocol import CommandFailed, ModelState, Progress, ReplyCode

__all__ = ["ModelLifecycle", "ModelServer", "ServingStats", "SwapDone"]

logger = logging.getLogger(__name__)

Status = Literal["serving", "stored", "probation", "degraded", "absent"]


LATENCY_FLOOR_MS = 1.0
RESTARTED_DURING_PROBATION = "agent restarted during probation"


class _SwapFailed(Exception):
    pass


@dataclass(frozen=True)
class _ModelStatus:
    status: Status
    message: str | None = None


def created_time(manifest: Manifest) -> datetime | None:
    """The manifest's ``created_at`` as an aware time (naive means UTC); None if unreadable."""
    try:
        at = datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


def _failure_text(rec: ModelRecord) -> str | None:
    """``<code>: version <v>: <why>`` of the last failed trial, while it is still news."""
    note = rec.failure
    if not note or note.get("version") not in rec.failed:
        return None
    return f"{note.get('code', '')}: version {note['version']}: {note.get('message', '')}"


def _failure_data(exc: ValidationFailed, name: str, version: str) -> dict[str, Any] | None:
    """A failed validation's figures for the reply (a golden mismatch's), if any."""
    if exc.data is None:
        return None
    return {"model": name, "version": version, **exc.data}


def _unused(name: str, version: str | None) -> str:
    return (
        f"no pipeline uses model {name}: version {version} is stored and validated, not "
        "served (a pipeline that names it in the config file serves it after a restart)"
    )


def _joined(*parts: str | None) -> str:
    return "; ".join(p for p in parts if p)


def _served(name: str, version: str, servers: list[ModelServer]) -> dict[str, Any]:
    """The reply's word on where ``version`` now serves: ``served`` and the pipelines."""
    where: dict[str, Any] = {"pipelines": [s.pipeline for s in servers], "served": bool(servers)}
    if not servers:
        where["note"] = _unused(name, version)
    return where


def _no_progress(stage: str, percent: float | None) -> None:
    pass


class ModelLifecycle:
    """Owns the model decisions of the agent; see the module docstring."""

    def __init__(
        self,
        store: ModelStore,
        validator: Validator,
        servers: Sequence[ModelServer] = (),
        *,
        probation: ProbationConfig | None = None,
        swap_timeout_s: float = 120.0,
        poll_s: float = 0.1,
        on_change: Callable[[], None] | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.validator = validator
        self.servers = list(servers)
        self.probation = probation or ProbationConfig()
        self.swap_timeout_s = swap_timeout_s
        self._poll_s = poll_s
        self._on_change = on_change
        self._stop = stop_event or threading.Event()
        self._locks_guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._status: dict[str, _ModelStatus] = {}

    @classmethod
    def from_config(
        cls,
        config: AgentConfig,
        servers: Sequence[ModelServer] = (),
        **kwargs: Any,
    ) -> ModelLifecycle:
        """The lifecycle as the config describes it (trusted keys are read here)."""
        m = config.models
        store = ModelStore(
            config.state_dir,
            trusted_keys=[load_public_key(p) for p in m.trusted_keys],
            require_signature=m.require_signature,
            keep_versions=m.keep_versions,
        )
        validator = Validator(
            runtime=config.runtime.prefer,
            num_threads=config.runtime.num_threads,
            timeout_s=m.validation.timeout_s,
            memory_mb=m.validation.memory_mb,
        )
        return cls(store, validator, servers, probation=m.probation, **kwargs)

    # ------------------------------------------------------------------ CommandTarget

    def deploy(
        self,
        manifest: dict[str, Any],
        signature: str | None,
        model_file: Path,
        pipeline: str | None,
        progress: Progress,
        *,
        shadow: bool | None = None,
        min_agreement: float | None = None,
    ) -> dict[str, Any]:
        """``shadow`` and ``min_agreement``: this deploy's own (default: the config's)."""
        name = self._name_of(manifest)
        servers = self._servers_for(name, pipeline)
        rule = ShadowRule.of(self.probation, shadow, min_agreement)
        with self._exclusive(name, "deploy"):
            return self._deploy(name, manifest, signature, model_file, servers, progress, rule)

    def check_deploy(self, name: str, pipeline: str | None) -> None:
        """The refusals a deploy gets whatever its file (see ``CommandTarget``); ``deploy``
        checks them again, as another command may have started meanwhile."""
        self._servers_for(name, pipeline)
        with self._locks_guard:
            lock = self._locks.get(name)
        if lock is not None and lock.locked():
            raise CommandFailed(ReplyCode.BUSY, _busy(name, "deploy"))

    def rollback(self, model: str, to_version: str | None, progress: Progress) -> dict[str, Any]:
        try:
            check_component(model, "model name")
            if to_version is not None:
                check_component(to_version, "version")
        except StoreError as exc:
            raise CommandFailed(ReplyCode.NOT_FOUND, exc.message) from None
        with self._exclusive(model, "rollback"):
            return self._rollback(model, to_version, progress)

    def model_states(self) -> list[ModelState]:
        used = {s.model_name for s in self.servers}
        names = set(self.store.names()) | used | set(self._status)
        states = []
        for name in sorted(names):
            rec = self.store.record(name)
            status = self._status.get(name) or _ModelStatus("serving" if rec.active else "absent")
            if status.status == "serving" and name not in used:
                status = _ModelStatus("stored", _joined(status.message, _unused(name, rec.active)))
            states.append(
                ModelState(
                    name=name,
                    active=rec.active,
                    last_known_good=rec.last_known_good,
                    status=status.status,
                    versions=rec.installed,
                    message=status.message,
                )
            )
        return states

    def last_failure(self, name: str) -> dict[str, str] | None:
        """The last failed trial of ``name`` (version, code, message, rolled_back_to),
        until a version passes; for the final reply to a deploy a restart interrupted."""
        return self.store.record(name).failure

    # ------------------------------------------------------------------ start-up

    def start(self) -> None:
        """Open the store and bring every model to a serving version; never raises."""
        self.store.open()
        names = set(self.store.names()) | {s.model_name for s in self.servers}
        for name in sorted(names):
            try:
                with self._exclusive(name, "start-up recovery"):
                    self._recover(name)
            except Exception as exc:  # one model's trouble must not stop the agent
                logger.exception("start-up recovery of model %s failed", name)
                self._set_status(name, "degraded", f"start-up recovery failed: {exc}")

    def stop(self) -> None:
        """Cut a running probation short (the version is not marked good)."""
        self._stop.set()

    def _recover(self, name: str) -> None:
        rec = self.store.record(name)
        servers = [s for s in self.servers if s.model_name == name]
        unproven = self._unproven_trial(name, rec)
        if unproven is not None:
            rec = self.store.record(name)
        candidates: list[str] = []
        for v in [rec.active, rec.last_known_good, *reversed(rec.installed)]:
            if v is not None and v not in candidates and v != unproven and v not in rec.failed:
                candidates.append(v)
        failures: list[str] = []
        for version in candidates:
            try:
                stored = self.store.get(name, version, verify=True)
                self._validate(stored, servers, use_current=False)
                self._swap_all(servers, version, stored.model_path)
            except (StoreError, ValidationFailed, _SwapFailed) as exc:
                reason = exc.message if isinstance(exc, StoreError | ValidationFailed) else exc
                failures.append(f"{version}: {reason}")
                logger.warning("model %s version %s cannot serve: %s", name, version, reason)
                continue
            kind = "last-known-good" if version == rec.last_known_good else "stored"
            if unproven is not None:
                self._fail_unproven(name, unproven, version)
                self._set_status(
                    name,
                    "degraded" if failures else "serving",
                    f"{_failure_text(self.store.record(name))}; serving {kind} version {version}"
                    + (f" ({'; '.join(failures)})" if failures else ""),
                )
            elif version != rec.active:
                self.store.set_active(name, version)
                self._set_status(
                    name,
                    "degraded",
                    f"active version {rec.active} failed ({'; '.join(failures)}); "
                    f"serving {kind} version {version}",
                )
            elif (failed := _failure_text(rec)) is not None:
                # Still true after any number of restarts, until a version passes.
                self._set_status(name, "serving", f"{failed}; serving {kind} version {version}")
            else:
                self._set_status(name, "serving")
            logger.info("model %s: serving version %s", name, version)
            return
        if unproven is not None:
            self._fail_unproven(name, unproven, None)
            rec = self.store.record(name)
        elif rec.active is not None:
            self.store.set_active(name, None)
        failed = _failure_text(rec)
        if failed is not None or failures:
            head = f"{failed}; " if failed is not None else ""
            detail = f"no valid version ({'; '.join(failures)})" if failures else "no other version"
            message = f"{head}{detail}; running without model {name}"
            self._set_status(name, "degraded", message)
            logger.error("model %s: %s", name, message)
        else:
            self._set_status(name, "absent", f"no version of model {name} is stored")

    def _unproven_trial(self, name: str, rec: ModelRecord) -> str | None:
        """The version that was on probation when the agent died, if any; drops a
        version whose deploy died before its swap (it never served, like a rejected one)."""
        trial = rec.trial
        if trial is None:
            return None
        if trial == rec.last_known_good:  # passed probation once already: proven
            return None
        if trial == rec.active:
            logger.error(
                "model %s version %s was on probation when the agent stopped; "
                "it is not served again",
                name,
                trial,
            )
            return trial
        logger.warning(
            "model %s: the deploy of version %s was interrupted before its swap; removing it",
            name,
            trial,
        )
        self._remove_quietly(name, trial)
        return None

    def _fail_unproven(self, name: str, version: str, serving: str | None) -> None:
        note = {
            "version": version,
            "code": ReplyCode.PROBATION_FAILED.value,
            "message": RESTARTED_DURING_PROBATION,
            "rolled_back_to": serving or "",
        }
        self.store.fail_trial(name, version, note, active=serving)

    # ------------------------------------------------------------------ deploy

    def _deploy(
        self,
        name: str,
        manifest: dict[str, Any],
        signature: str | None,
        model_file: Path,
        servers: list[ModelServer],
        progress: Progress,
        shadow_rule: ShadowRule | None = None,
    ) -> dict[str, Any]:
        before = self.store.record(name)
        progress("installing", None)
        try:
            self._refuse_downgrade(self.store.check_manifest(manifest, signature), before)
            stored = self.store.install(manifest, signature, model_file, trial=True)
        except StoreError as exc:
            raise CommandFailed(exc.code, exc.message) from None
        version = stored.version
        previous = before.active
        if previous == version and all(s.serving_version() == version for s in servers):
            return {"model": name, "version": version, "previous": previous, "unchanged": True}
        fresh = version not in before.installed
        shadow: dict[str, Any] = {}
        try:
            progress("validating", None)
            try:
                report = self._validate(stored, servers, use_current=True)
            except ValidationFailed as exc:
                raise CommandFailed(
                    exc.code, f"{name} {version}: {exc.message}", _failure_data(exc, name, version)
                ) from None
            shadowing = shadow_servers(servers, version) if shadow_rule is not None else []
            if shadow_rule is not None and shadowing:
                shadow = run_shadow(
                    name, version, stored.model_path, shadowing, shadow_rule, progress, self._stop,
                    build_timeout_s=self.swap_timeout_s, poll_s=self._poll_s,
                )  # fmt: skip

            baseline = {s.pipeline: self._stats_of(s, previous) for s in servers}
            progress("swapping", None)
            # Active (and still on trial) before the first frame reaches it: a crash from
            # here on finds it on trial at the restart and does not serve it again.
            try:
                self.store.set_active(name, version)
            except StoreError as exc:
                raise CommandFailed(exc.code, exc.message) from None
            try:
                self._swap_all(servers, version, stored.model_path)
            except _SwapFailed as exc:
                self._restore(name, servers, previous)
                self._reactivate_quietly(name, previous)
                raise CommandFailed(
                    ReplyCode.VALIDATION_FAILED, f"{name} {version}: {exc}"
                ) from None
        except BaseException:
            # It never served: like a rejected version, it is not kept (unless it was
            # stored before this deploy).
            if fresh:
                self._remove_quietly(name, version)
            raise
        if servers:
            self._set_status(name, "probation", f"version {version} on probation")
            progress("probation", None)
            problem, figures = self._probation(servers, version, baseline)
        else:
            # No pipeline uses it: no frame would reach it, so there is nothing to wait for.
            problem, figures = None, {}
        if problem is not None and self._stop.is_set():
            # No swap while the agent stops: the version stays on trial in the store,
            # and the next start puts last-known-good back, as after a crash.
            raise CommandFailed(
                ReplyCode.PROBATION_FAILED,
                f"{name} {version}: the agent stopped during probation; the next start "
                "serves the last-known-good version",
                {"model": name, "version": version},
            )
        if problem is not None:
            target = self._rollback_after_probation(name, version, servers, problem)
            raise CommandFailed(
                ReplyCode.PROBATION_FAILED,
                f"{name} {version} failed probation: {problem}; "
                + (f"rolled back to {target}" if target else "no version to roll back to"),
                {"model": name, "version": version, "rolled_back_to": target},
            )
        try:
            self.store.mark_good(name, version)
        except StoreError as exc:
            logger.warning("model %s %s serves but is not marked good: %s", name, version, exc)
        self._set_status(name, "serving")
        if servers:
            logger.info("model %s version %s passed probation", name, version)
        else:
            logger.warning("model %s version %s: %s", name, version, _unused(name, version))
        return {
            "model": name,
            "version": version,
            "previous": previous,
            **_served(name, version, servers),
            "probation": figures,
            **({"golden": report.golden} if report.golden is not None else {}),
            **({"shadow": shadow} if shadow else {}),
        }

    def _refuse_downgrade(self, manifest: Manifest, rec: ModelRecord) -> None:
        """A deploy only moves a model forward; going back is the ``rollback`` command's job.

        Refused (``downgrade``) unless it names the active version: a version stored
        here already (it served, or failed, before), or one whose manifest was created
        before the active version's (the last-known-good one's when none is active).
        So a replayed old signed deploy cannot silently take a device back.
        """
        name, version = manifest.name, manifest.version
        if version == rec.active:
            return
        hint = "use the rollback command to go back to an older version"
        if version in rec.installed:
            what = "failed probation here" if version in rec.failed else "is stored here already"
            raise CommandFailed(
                ReplyCode.DOWNGRADE,
                f"{name} {version} {what} and is not the active version "
                f"({rec.active or 'none'}); a deploy does not bring it back: {hint} "
                f"(rollback --to {version})",
            )
        reference = rec.active or rec.last_known_good
        if reference is None:
            return
        try:
            current = self.store.get(name, reference).manifest
        except StoreError:
            return  # an unreadable version is no reference; recovery deals with it
        new_at, current_at = created_time(manifest), created_time(current)
        if new_at is not None and current_at is not None and new_at < current_at:
            raise CommandFailed(
                ReplyCode.DOWNGRADE,
                f"{name} {version} was created at {manifest.created_at}, before version "
                f"{reference} on this device ({current.created_at}); {hint}",
            )

    def _probation(
        self,
        servers: list[ModelServer],
        version: str,
        baseline: dict[str, ServingStats | None],
    ) -> tuple[str | None, dict[str, Any]]:
        """(reason it failed or None, figures per pipeline)."""
        p = self.probation
        start = time.monotonic()
        hard_limit = max(3 * p.duration_s, p.duration_s + 60.0)
        figures: dict[str, Any] = {}
        while True:
            elapsed = time.monotonic() - start
            enough = True
            for server in servers:
                stats = server.stats(version)
                if stats is None:
                    return f"pipeline {server.pipeline} is not serving it", figures
                figures[server.pipeline] = {
                    "invokes": stats.invokes,
                    "errors": stats.errors,
                    "nonfinite": stats.nonfinite,
                    "p95_ms": stats.p95_ms,
                }
                where = f"on pipeline {server.pipeline}"
                if stats.errors:
                    return (
                        f"{stats.errors} invoke errors {where} ({stats.last_error})",
                        figures,
                    )
                if stats.nonfinite:
                    return f"{stats.nonfinite} NaN/inf outputs {where}", figures
                enough = enough and stats.invokes >= p.min_inferences
            if elapsed >= p.duration_s and enough:
                return self._latency_problem(servers, version, baseline), figures
            if elapsed >= hard_limit:
                return (
                    f"fewer than {p.min_inferences} inferences in {elapsed:.0f}s",
                    figures,
                )
            if self._stop.wait(self._poll_s):
                return "the agent stopped during probation", figures

    def _latency_problem(
        self, servers: list[ModelServer], version: str, baseline: dict[str, ServingStats | None]
    ) -> str | None:
        ratio = self.probation.max_latency_ratio
        for server in servers:
            before = baseline.get(server.pipeline)
            now = server.stats(version)
            if before is None or now is None or before.p95_ms is None or now.p95_ms is None:
                continue
            # Sub-millisecond models jitter by multiples under load; a slowdown that
            # costs less than LATENCY_FLOOR_MS a frame is not worth a rollback.
            if now.p95_ms > ratio * before.p95_ms and now.p95_ms - before.p95_ms > LATENCY_FLOOR_MS:
                return (
                    f"p95 invoke latency {now.p95_ms:.2f} ms on pipeline {server.pipeline} is "
                    f"over {ratio:g}x the previous version's {before.p95_ms:.2f} ms"
                )
        return None

    def _rollback_after_probation(
        self, name: str, failed: str, servers: list[ModelServer], problem: str
    ) -> str | None:
        rec = self.store.record(name)
        candidates = [rec.last_known_good] if rec.last_known_good not in (None, failed) else []
        candidates += [
            v
            for v in reversed(rec.installed)
            if v not in (failed, *candidates) and v not in rec.failed
        ]
        note = {"version": failed, "code": ReplyCode.PROBATION_FAILED.value, "message": problem}
        for version in candidates:
            assert version is not None
            try:
                stored = self.store.get(name, version, verify=True)
                if version != rec.last_known_good:
                    self._validate(stored, servers, use_current=False)
                self._swap_all(servers, version, stored.model_path)
                self.store.fail_trial(
                    name, failed, {**note, "rolled_back_to": version}, active=version
                )
            except (StoreError, ValidationFailed, _SwapFailed) as exc:
                logger.warning("model %s: cannot roll back to %s: %s", name, version, exc)
                continue
            self._set_status(
                name, "serving", f"version {failed} failed probation ({problem}); rolled back"
            )
            logger.warning(
                "model %s %s failed probation (%s); rolled back to %s",
                name,
                failed,
                problem,
                version,
            )
            return version
        try:
            self._swap_all(servers, None, None)
            self.store.fail_trial(name, failed, {**note, "rolled_back_to": ""}, active=None)
        except (StoreError, _SwapFailed) as exc:
            logger.error("model %s: cannot unload %s: %s", name, failed, exc)
        self._set_status(
            name,
            "degraded",
            f"version {failed} failed probation ({problem}); no version to roll back to, "
            f"running without model {name}",
        )
        return None

    # ------------------------------------------------------------------ rollback

    def _rollback(self, name: str, to_version: str | None, progress: Progress) -> dict[str, Any]:
        rec = self.store.record(name)
        if not rec.installed:
            raise CommandFailed(ReplyCode.NOT_FOUND, f"model {name} is not stored on this device")
        target = to_version
        if target is None:
            target = next(
                (
                    v
                    for v in (rec.previous, rec.last_known_good)
                    if v is not None
                    and v != rec.active
                    and v in rec.installed
                    and v not in rec.failed
                ),
                None,
            )
            if target is None:
                raise CommandFailed(
                    ReplyCode.NOT_FOUND, f"model {name} has no previous version to roll back to"
                )
        servers = [s for s in self.servers if s.model_name == name]
        if target == rec.active and all(s.serving_version() == target for s in servers):
            return {"model": name, "version": target, "previous": rec.active, "unchanged": True}
        try:
            stored = self.store.get(name, target, verify=True)
        except StoreError as exc:
            raise CommandFailed(exc.code, exc.message) from None
        progress("validating", None)
        try:
            self._validate(stored, servers, use_current=False)
        except ValidationFailed as exc:
            raise CommandFailed(
                exc.code, f"{name} {target}: {exc.message}", _failure_data(exc, name, target)
            ) from None
        progress("swapping", None)
        try:
            self._swap_all(servers, target, stored.model_path)
        except _SwapFailed as exc:
            self._restore(name, servers, rec.active)
            raise CommandFailed(ReplyCode.VALIDATION_FAILED, f"{name} {target}: {exc}") from None
        try:
            self.store.set_active(name, target)
            self.store.mark_good(name, target)
        except StoreError as exc:
            raise CommandFailed(exc.code, exc.message) from None
        self._set_status(name, "serving", f"rolled back to {target} by command")
        logger.info("model %s rolled back from %s to %s", name, rec.active, target)
        return {
            "model": name,
            "version": target,
            "previous": rec.active,
            **_served(name, target, servers),
        }

    # ------------------------------------------------------------------ helpers

    def _name_of(self, manifest: dict[str, Any]) -> str:
        name = manifest.get("name") if isinstance(manifest, dict) else None
        if name is None:
            try:
                parse_manifest(manifest)  # names every missing or bad key
            except ManifestError as exc:
                raise CommandFailed(ReplyCode.BAD_MANIFEST, str(exc)) from None
        try:
            return check_component(name, "model name")
        except StoreError as exc:
            raise CommandFailed(exc.code, exc.message) from None

    def _servers_for(self, name: str, pipeline: str | None) -> list[ModelServer]:
        if pipeline is None:
            return [s for s in self.servers if s.model_name == name]
        for server in self.servers:
            if server.pipeline == pipeline:
                if server.model_name != name:
                    raise CommandFailed(
                        ReplyCode.INCOMPATIBLE,
                        f"pipeline {pipeline} serves model {server.model_name}, not {name}",
                    )
                return [server]
        raise CommandFailed(ReplyCode.NOT_FOUND, f"no pipeline named {pipeline}")

    def _exclusive(self, name: str, what: str) -> _Held:
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        if not lock.acquire(blocking=False):
            raise CommandFailed(ReplyCode.BUSY, _busy(name, what))
        return _Held(lock)

    def _validate(
        self, stored: StoredVersion, servers: list[ModelServer], *, use_current: bool
    ) -> ValidationReport:
        """Run the child once (golden samples too), then check the fit for every
        pipeline that will serve it."""
        manifest = stored.manifest
        report = self.validator.run(stored.model_path, manifest.golden, input_shapes(manifest))
        requirements: list[Requirements | None] = [s.requirements() for s in servers]
        if use_current and None in requirements:
            current = self._current_requirements(stored.name)
            requirements = [r if r is not None else current for r in requirements]
        for req in dict.fromkeys(requirements) or [None]:
            check_fit(report, stored.manifest, req)
        return report

    def _current_requirements(self, name: str) -> Requirements | None:
        active = self.store.record(name).active
        if active is None:
            return None
        try:
            return Requirements.of(self.store.get(name, active).manifest)
        except StoreError:
            return None

    def _swap_all(
        self, servers: list[ModelServer], version: str | None, path: Path | None
    ) -> list[SwapDone]:
        futures = [(s, s.swap(version, path)) for s in servers]
        done, errors = [], []
        for server, future in futures:
            try:
                done.append(future.result(self.swap_timeout_s))
            except FutureTimeout:
                errors.append(f"pipeline {server.pipeline}: swap timed out")
            except Exception as exc:
                errors.append(f"pipeline {server.pipeline}: {exc}")
        if errors:
            raise _SwapFailed("; ".join(errors))
        return done

    def _restore(self, name: str, servers: list[ModelServer], version: str | None) -> None:
        """Put ``version`` back on the pipelines after a failed swap (best effort)."""
        back = [s for s in servers if s.serving_version() != version]
        if not back:
            return
        try:
            path = self.store.get(name, version).model_path if version else None
            self._swap_all(back, version, path)
        except (StoreError, _SwapFailed) as exc:
            logger.error("model %s: cannot put %s back: %s", name, version, exc)

    @staticmethod
    def _stats_of(server: ModelServer, version: str | None) -> ServingStats | None:
        return server.stats(version) if version is not None else None

    def _reactivate_quietly(self, name: str, version: str | None) -> None:
        try:
            self.store.set_active(name, version)
        except StoreError as exc:
            logger.error("model %s: cannot record %s as active again: %s", name, version, exc)

    def _remove_quietly(self, name: str, version: str) -> None:
        try:
            self.store.remove(name, version)
        except (StoreError, OSError) as exc:
            logger.warning("cannot remove rejected %s %s: %s", name, version, exc)

    def _set_status(self, name: str, status: Status, message: str | None = None) -> None:
        self._status[name] = _ModelStatus(status, message)
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                logger.exception("model state listener failed")


class _Held:
    """A lock already acquired, released when the ``with`` block ends."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _busy(name: str, what: str) -> str:
    return f"model {name} is busy with another deploy or rollback; retry the {what} later"
