"""Test helpers of this folder (the branch point's finalize) are importable by name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
