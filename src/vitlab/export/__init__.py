"""Deployment: validated ONNX export (with int8 quantisation) and running the exported file.

``onnx``, ``onnxruntime`` and ``onnxscript`` are the optional extra ``vitlab[export]``; importing this
package works without them, and the functions that need them raise :class:`ExportUnavailableError`.
"""

from vitlab.export.onnx import (
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_TOLERANCE,
    ExportError,
    ExportReport,
    ExportValidationError,
    SizeCheck,
    bundled_images,
    export_onnx,
    other_sizes,
    preprocess,
    quantize_int8,
)
from vitlab.export.runtime import (
    ExportUnavailableError,
    InputSizeError,
    OnnxModel,
    is_onnx_file,
    read_metadata,
)

__all__ = [
    "DEFAULT_MIN_AGREEMENT", "DEFAULT_TOLERANCE", "ExportError", "ExportReport", "ExportUnavailableError",
    "ExportValidationError", "InputSizeError", "OnnxModel", "SizeCheck", "bundled_images", "export_onnx",
    "is_onnx_file", "other_sizes", "preprocess", "quantize_int8", "read_metadata",
]
