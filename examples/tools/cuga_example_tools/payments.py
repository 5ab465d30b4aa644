"""``transfer_funds``: a sensitive tool (capability ``payments``) the approval policy gates."""

from __future__ import annotations

import hashlib
import math
from typing import Any

from cuga.tools import ToolContext, ToolSpec

CURRENCIES = ("CHF", "EUR", "GBP", "JPY", "USD")
#: Above this the (simulated) bank refuses the transfer outright.
TRANSFER_LIMIT = 1_000_000.0


def _transfer_funds(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    amount = float(inputs["amount"])
    currency = inputs["currency"]
    source, target = inputs["from_account"], inputs["to_account"]
    # The schema already says this; a handler that moves money checks again anyway.
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(f"amount must be greater than 0, got {amount}")
    if currency not in CURRENCIES:
        raise ValueError(f"currency {currency!r} is not supported ({', '.join(CURRENCIES)})")
    if source == target:
        raise ValueError("from_account and to_account must differ")
    if amount > TRANSFER_LIMIT:
        raise PermissionError(f"amount {amount:.2f} {currency} exceeds the transfer limit")
    # Derived from the run and step, so a retried step yields the same confirmation.
    digest = hashlib.sha256(
        f"{context.run_id}/{context.step_id}/{source}/{target}/{amount:.2f}/{currency}".encode()
    ).hexdigest()
    return {
        "confirmation_id": f"TX-{digest[:12].upper()}",
        "from_account": source,
        "to_account": target,
        "amount": round(amount, 2),
        "currency": currency,
        "status": "settled",
    }


_ACCOUNT = {"type": "string", "pattern": r"^[A-Z]{2}[0-9A-Z]{4,30}$"}

TRANSFER_FUNDS = ToolSpec(
    name="transfer_funds",
    description="Transfers money between two accounts (simulated). Sensitive: needs approval.",
    parameters={
        "type": "object",
        "properties": {
            "from_account": {**_ACCOUNT, "description": "IBAN-like source account"},
            "to_account": {**_ACCOUNT, "description": "IBAN-like destination account"},
            "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 10_000_000},
            "currency": {"type": "string", "enum": list(CURRENCIES)},
            "memo": {"type": "string", "maxLength": 140},
        },
        "required": ["from_account", "to_account", "amount", "currency"],
        "additionalProperties": False,
    },
    handler=_transfer_funds,
    capabilities=("payments",),
    sensitive=True,
    cost=5.0,
    timeout=10.0,
    keywords=("transfer", "pay", "payment", "send", "money", "funds"),
)
