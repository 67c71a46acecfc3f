"""The JSON form of an Inventory (`devices --json`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from llamalaunch.probe.inventory import Inventory


def inventory_to_dict(inventory: Inventory) -> dict[str, Any]:
    return {
        "schema": 1,
        "devices": [dataclasses.asdict(device) for device in inventory.devices],
        "host": dataclasses.asdict(inventory.host),
        "problems": list(inventory.problems),
        "notes": list(inventory.notes),
        "unknown_memory": list(inventory.unknown_memory),
    }
