"""Reads the records of an offline W&B run file (`run-<id>.wandb`) back, for the tests.

The file is a LevelDB-style log (a 7-byte file header ":W&B", magic 0xBEE1, version 0; then 32 KiB
blocks of records, each with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) whose
payloads are wandb's own protobuf `Record` messages. wandb 0.31 no longer ships the Python reader
it used to have (wandb.sdk.internal.datastore), so this follows the format and decodes each payload
with wandb's protobuf classes.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, "not a W&B run file"
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        if BLOCK - offset % BLOCK < HEADER:  # the rest of a block too small for a header is padding
            offset += BLOCK - offset % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if kind == 0 and length == 0:  # zero fill at the end of the file
            break
        payload = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def history(records: list) -> list[dict]:
    """Every logged row, as {key: value}."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def config(records: list) -> dict:
    values = {}
    for r in records:  # the run record carries the initial config, config records later changes
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            for item in (r.run.config if kind == "run" else r.config).update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values
