"""The planner: (model, method, GPU pools) -> a Plan with its reasons. Pure functions only."""

from kubeforge.planner.architecture import Architecture, ArchitectureUnknown, resolve
from kubeforge.planner.plan import Plan
from kubeforge.planner.search import plan

__all__ = ["Architecture", "ArchitectureUnknown", "Plan", "plan", "resolve"]
