"""onnx-merge: prune channels of ONNX models and merge what they carried into the next layer."""

from .api import compress, compress_file, inspect_model
from .errors import ModelError, OnnxMergeError, UsageError, VerificationError
from .io import load_model, save_model
from .options import CompressOptions
from .verify import Tolerance, verify_models

__version__ = "0.1.0"
__all__ = ["CompressOptions", "ModelError", "OnnxMergeError", "Tolerance", "UsageError", "VerificationError",
           "compress", "compress_file", "inspect_model", "load_model", "save_model", "verify_models"]
