"""The one place that imports torchvision and torch-fidelity.

The torchvision wheel pinned next to CPU torch ships compiled ops (``torchvision._C``)
that do not load against this torch build. torchvision then still imports its pure
Python parts, but ``torchvision/_meta_registrations.py`` unconditionally registers
fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, which fails with
``RuntimeError: operator torchvision::nms does not exist``. Everything that uses
torchvision (and torch-fidelity, which imports it) must import it through
:func:`import_torchvision` / :func:`import_torch_fidelity`, which define the missing
operator *schemas* (no kernels: calling ``nms`` still raises) with ``torch.library``
before importing, and only when the first import fails.

The schemas are the ones torchvision's C++ library registers (``torchvision/csrc/ops``);
the ops that ``_meta_registrations.py`` touches are nms, qnms, the roi_align / roi_pool /
ps_roi_align / ps_roi_pool families (forward + backward), qroi_align and deform_conv2d.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

#: op name -> schema (arguments and returns), exactly as torchvision's C++ ops define them.
TORCHVISION_OP_SCHEMAS: dict[str, str] = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": (
        "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "_roi_align_backward": (
        "(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
        "SymInt width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "ps_roi_align": (
        "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"
    ),
    "_ps_roi_align_backward": (
        "(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
        "SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    "roi_pool": (
        "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_roi_pool_backward": (
        "(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
        "SymInt width) -> Tensor"
    ),
    "ps_roi_pool": (
        "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_ps_roi_pool_backward": (
        "(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor"
    ),
    "qroi_align": (
        "(Tensor input, Tensor rois, float input_scale, int input_zero_point, "
        "float rois_scale, int rois_zero_point, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "deform_conv2d": (
        "(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
        "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"
    ),
    "_deform_conv2d_backward": (
        "(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
        "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
}

_defined_ops: list[str] = []


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def define_torchvision_op_schemas() -> list[str]:
    """Define (schema only) every torchvision op that is not registered yet; returns those defined."""
    newly: list[str] = []
    for name, schema in TORCHVISION_OP_SCHEMAS.items():
        if _op_exists(name):
            continue
        torch.library.define(f"torchvision::{name}", schema, lib=_library())
        newly.append(name)
    _defined_ops.extend(newly)
    return newly


_LIB: torch.library.Library | None = None


def _library() -> torch.library.Library:
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 - kept alive here
    return _LIB


def _drop_partial_modules(prefix: str) -> None:
    for mod in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[mod]


def import_torchvision() -> ModuleType:
    """``import torchvision``; when the compiled ops fail to load, define their schemas and retry."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        logger.info("torchvision ops did not load (%s); defining op schemas and retrying", err)
    _drop_partial_modules("torchvision")
    define_torchvision_op_schemas()
    return importlib.import_module("torchvision")


def import_torch_fidelity() -> ModuleType:
    """``import torch_fidelity`` (which imports torchvision) through :func:`import_torchvision`."""
    import_torchvision()
    return importlib.import_module("torch_fidelity")


def defined_op_names() -> tuple[str, ...]:
    """Names of the torchvision op schemas this module had to define (empty if none were needed)."""
    return tuple(_defined_ops)
