"""The API of kubeforge.io/v1alpha1: typed models, validation and the CRDs generated from them."""

from kubeforge.api.finetune import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from kubeforge.api.kinds import API_VERSION, BY_KIND, GROUP, KINDS, VERSION, Kind
from kubeforge.api.quantize import QuantizeJob, QuantizeJobSpec, QuantizeJobStatus
from kubeforge.api.service import ModelService, ModelServiceSpec, ModelServiceStatus
from kubeforge.api.validation import InvalidResource, Problem, check, immutable_changes, parse

__all__ = [
    "API_VERSION",
    "BY_KIND",
    "GROUP",
    "KINDS",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "InvalidResource",
    "Kind",
    "ModelService",
    "ModelServiceSpec",
    "ModelServiceStatus",
    "Problem",
    "QuantizeJob",
    "QuantizeJobSpec",
    "QuantizeJobStatus",
    "check",
    "immutable_changes",
    "parse",
]
