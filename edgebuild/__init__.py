"""edgebuild: transfer, compress, export, validate and bundle models for edge devices."""

import os as _os

# onnxruntime (1.2x) writes a device id and a database under ~/.cache/Microsoft when imported;
# a build writes only into its output and cache folders.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
