"""``python -m device_agent``: the same as the ``edgekit-agent`` command."""

from __future__ import annotations

from device_agent.cli import main

raise SystemExit(main())
