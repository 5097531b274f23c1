"""Reference ONNX models built from weight files with onnx and NumPy only (no torch)."""
