"""kopf handlers: decorators and one call each; every decision lives in pure functions."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubeforge.api.kinds import GROUP, VERSION
from kubeforge.controller.admission import admission_status
from kubeforge.controller.conditions import now_rfc3339

FINETUNEJOBS = (GROUP, VERSION, "finetunejobs")
QUANTIZEJOBS = (GROUP, VERSION, "quantizejobs")
MODELSERVICES = (GROUP, VERSION, "modelservices")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Keep kopf's bookkeeping in annotations: our status schema is structural and would prune it."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300


@kopf.on.resume(*FINETUNEJOBS)
@kopf.on.create(*FINETUNEJOBS)
@kopf.on.update(*FINETUNEJOBS)
def finetunejob(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Validate and record what the operator saw."""
    patch.status.update(admission_status(body, now_rfc3339()))


@kopf.on.resume(*QUANTIZEJOBS)
@kopf.on.create(*QUANTIZEJOBS)
@kopf.on.update(*QUANTIZEJOBS)
def quantizejob(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Validate and record what the operator saw."""
    patch.status.update(admission_status(body, now_rfc3339()))


@kopf.on.resume(*MODELSERVICES)
@kopf.on.create(*MODELSERVICES)
@kopf.on.update(*MODELSERVICES)
def modelservice(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Validate and record what the operator saw."""
    patch.status.update(admission_status(body, now_rfc3339()))
