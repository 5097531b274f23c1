"""The console entry point. Ctrl-C or SIGTERM while onnx and onnxruntime load exits 130/143 with
one line, as later: the signals are held while the modules load (an interrupt inside an
extension module's start-up can crash the interpreter), and cli.main releases them once its
handlers are in place."""

import signal
import sys

_HELD = {signal.SIGINT, signal.SIGTERM}


def main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    from .cli import main as run

    pending = signal.sigpending() & _HELD
    if pending:
        print("onnx-merge: interrupted", file=sys.stderr)
        return 128 + int(min(pending))
    return run()
