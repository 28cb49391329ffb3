"""edgebuild: transfer, compress, export, validate and bundle models for edge devices."""

import os as _os
import sys as _sys

# onnxruntime (1.2x) writes a device id and a database under ~/.cache/Microsoft when imported;
# a build writes only into its output and cache folders.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# OpenVINO (ovc, imported with openvino) and NNCF start openvino_telemetry on import: it writes
# ~/intel/openvino_ga_cid and ~/intel/stats and may send usage data. openvino_telemetry 2025.x has
# no environment switch (its only opt-out is a consent file under HOME, itself a write there);
# both libraries fall back to their built-in no-op stub when the package cannot be imported.
_sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
_os.environ.setdefault("NNCF_CI", "1")  # NNCF's own switch to its no-op telemetry

__version__ = "0.1.0"
