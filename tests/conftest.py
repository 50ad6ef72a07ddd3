"""Test-wide setup: hermetic environment (no hub, no telemetry), shared fixtures from tests/fixtures/."""

import os
import sys
from pathlib import Path

# Must be set before gcsfs/dvc are imported anywhere (else each gcsfs call against the emulator hangs ~60 s).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
# Subprocesses (`textmill ...`, `dvc ...`) come from the same venv as the tests.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

pytest_plugins = ["tests.fixtures.gcs", "tests.fixtures.models", "tests.fixtures.data"]
