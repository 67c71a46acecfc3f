"""The JSON form of an Inventory (`devices --json`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from llamalaunch.probe.device import Device
from llamalaunch.probe.inventory import Inventory


def inventory_to_dict(inventory: Inventory) -> dict[str, Any]:
    """Schema 1. A device listed in `unknown_memory` (a busy worker) has `free_bytes` and `total_bytes` null."""
    return {
        "schema": 1,
        "devices": [_device_to_dict(device, device.name in inventory.unknown_memory) for device in inventory.devices],
        "host": dataclasses.asdict(inventory.host),
        "problems": [*inventory.problems, *(str(worker.error) for worker in inventory.down)],
        "notes": list(inventory.notes),
        "unknown_memory": list(inventory.unknown_memory),
    }


def _device_to_dict(device: Device, unknown: bool) -> dict[str, Any]:
    fields = dataclasses.asdict(device)
    if unknown:
        fields.update(free_bytes=None, total_bytes=None)
    return fields
