"""Clients we did not write (tests/clients: node-opcua, Tahu's sparkplug-payload, MQTT.js), run with Node.js."""

from __future__ import annotations

from pathlib import Path

import pytest

CLIENTS = Path(__file__).parents[1] / "clients"  # third-party clients (npm), installed by tests/run


def node_client(script: str, args: dict, timeout: float = 120) -> dict:
    """Run one of tests/clients' Node.js scripts (node-opcua, Tahu's sparkplug-payload, MQTT.js) with `args`;
    what it printed, as JSON."""
    import json
    import subprocess

    if not (CLIENTS / "node_modules").is_dir():
        pytest.fail("the Node.js test clients are not installed: run tests/run (it runs npm ci in tests/clients)")
    done = subprocess.run(["node", str(CLIENTS / script), json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout, cwd=CLIENTS)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
