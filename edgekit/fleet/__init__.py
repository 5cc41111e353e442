"""The fleet controller: device registry, staged rollouts, REST API, dashboard, simulator.

Runs on a server (``edgekit fleet serve``); nothing here is imported by ``device_agent``. The
two sides share only :mod:`edgekit.protocol` (MQTT) and the bundle format. The modules, one
job each:

* :mod:`~edgekit.fleet.spec` parses what operators write (gates, waves, targets, durations);
* :mod:`~edgekit.fleet.db` is the schema and sessions (SQLite or PostgreSQL);
* :mod:`~edgekit.fleet.ingest` writes device messages into the registry;
* :mod:`~edgekit.fleet.registry` answers questions about devices and owns their labels;
* :mod:`~edgekit.fleet.rollouts` is the rollout state machine;
* :mod:`~edgekit.fleet.publisher` gets desired states and commands onto the broker once;
* :mod:`~edgekit.fleet.artifacts` stores and serves bundles;
* :mod:`~edgekit.fleet.api`, :mod:`~edgekit.fleet.auth`, :mod:`~edgekit.fleet.dashboard`
  are the HTTP side; :mod:`~edgekit.fleet.server` wires everything;
* :mod:`~edgekit.fleet.simulate` simulates devices; :mod:`~edgekit.fleet.client` is the CLI's
  REST client.

Only the standard-library modules (``spec``, ``errors``, ``client``, ``auth``) are imported by
the ``edgekit`` CLI at start-up; the others need the ``fleet`` extra.
"""

from __future__ import annotations

__all__: list[str] = []
