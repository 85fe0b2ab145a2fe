"""The part of ObjectMeta a user writes; what the API server adds is kept as is."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field

from kubeforge.api.base import DNSLabel, DNSSubdomain, KubeModel, Rule


class ObjectMeta(KubeModel):
    # uid, resourceVersion, generation, ownerReferences... come from the server: keep them.
    model_config = ConfigDict(extra="allow")

    name: DNSSubdomain | None = None
    generate_name: Annotated[str, Field(max_length=200)] | None = None
    namespace: DNSLabel | None = None
    labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    rules = (
        Rule(
            cel="has(self.name) || has(self.generateName)",
            message="name (or generateName) is required",
            check=lambda m: m.name is not None or m.generate_name is not None,
            field=".name",
        ),
    )
