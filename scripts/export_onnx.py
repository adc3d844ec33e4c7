#!/usr/bin/env python
"""Export a trained network to ONNX and check it against PyTorch with onnxruntime.

The command line of ``nl_plugin.onnx_export``; ``python scripts/export_onnx.py -h`` shows its usage.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nl_plugin.onnx_export import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
