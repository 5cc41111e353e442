"""Test-wide setup: make the shared helpers in tests/support importable as ``support``.

Appended, not prepended: tests/ holds folders named like the packages (tests/device_agent), and
pytest's ``pythonpath = ["."]`` puts the real packages first.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).parent))
