"""``python -m onnx_merge``: the command line."""

import sys

from .cli import main

sys.exit(main())
