"""How every ``cuga`` command writes ``--json`` output: one compact object per line."""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message


def json_line(item: Message | dict[str, Any]) -> None:
    """Write one JSON object (a message with its .proto field names, or a dict) and a newline."""
    data = (
        json_format.MessageToDict(item, preserving_proto_field_name=True)
        if isinstance(item, Message)
        else item
    )
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()


__all__ = ["json_line"]
