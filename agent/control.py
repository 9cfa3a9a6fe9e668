"""What the command plane may ask of the agent: the ``CommandTarget`` the link declares.

Model commands go to the lifecycle; pipeline and config commands to their owners.
The link never sees these objects: the service hands it this one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import ConfigError
from agent.live import LiveConfig
from agent.loops.pipeline import Pipeline
from agent.models.lifecycle import ModelLifecycle
from agent.protocol import CommandFailed, ModelState, Progress, ReplyCode


class AgentControl:
    def __init__(
        self,
        lifecycle: ModelLifecycle,
        pipelines: dict[str, Pipeline],
        live: LiveConfig,
        status_extra: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.lifecycle = lifecycle
        self.pipelines = pipelines
        self.live = live
        self.status_extra = status_extra

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
        self._check_pipeline(pipeline)
        return self.lifecycle.deploy(
            manifest,
            signature,
            model_file,
            pipeline,
            progress,
            shadow=shadow,
            min_agreement=min_agreement,
        )

    def rollback(self, model: str, to_version: str | None, progress: Progress) -> dict[str, Any]:
        return self.lifecycle.rollback(model, to_version, progress)

    def check_deploy(self, model: str, pipeline: str | None) -> None:
        self._check_pipeline(pipeline)
        self.lifecycle.check_deploy(model, pipeline)

    def _check_pipeline(self, pipeline: str | None) -> None:
        if pipeline is not None and pipeline not in self.pipelines:
            raise CommandFailed(ReplyCode.NOT_FOUND, f"no pipeline named {pipeline!r}")

    def model_states(self) -> list[ModelState]:
        return self.lifecycle.model_states()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "models": [m.model_dump(exclude_none=True) for m in self.model_states()],
            "pipelines": {
                name: {
                    **p.state().model_dump(exclude_none=True),
                    **p.telemetry(now, "status").model_dump(exclude_none=True),
                }
                for name, p in self.pipelines.items()
            },
            "restart_needed": self.live.restart_needed,
            **self.status_extra(),
        }

    def apply_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.live.apply(changes)
        except ConfigError as err:
            raise CommandFailed(ReplyCode.CONFIG_REJECTED, "; ".join(err.problems)) from None

    def restart(self, pipeline: str | None) -> dict[str, Any]:
        if pipeline is not None and pipeline not in self.pipelines:
            raise CommandFailed(ReplyCode.NOT_FOUND, f"no pipeline named {pipeline!r}")
        names = [pipeline] if pipeline else list(self.pipelines)
        for name in names:
            self.pipelines[name].restart_source()
        return {"restarted": names}
