"""onnx-merge: prune channels of ONNX models and merge what they carried into the next layer."""

import importlib

__version__ = "0.1.0"
# Loaded on first use (PEP 562): the console entry point imports the package before it can
# catch Ctrl-C, so importing it must not pull in onnx and onnxruntime.
_EXPORTS = {"compress": "api", "compress_file": "api", "inspect_model": "api", "ModelError": "errors",
            "OnnxMergeError": "errors", "UsageError": "errors", "VerificationError": "errors",
            "load_model": "io", "save_model": "io", "CompressOptions": "options", "Tolerance": "verify",
            "verify_models": "verify"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
