"""The console entry point. Ctrl-C while onnx and onnxruntime load exits 130 with one line,
as it does later (cli.main handles it from there on)."""

import sys


def main() -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("onnx-merge: interrupted", file=sys.stderr)
        return 130
    return run()
