"""``python -m onnx_merge``: the command line."""

import sys

from .launch import main

sys.exit(main())
