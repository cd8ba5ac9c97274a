"""The roles a chat message may have, declared once for the facade's request models and the router."""

from __future__ import annotations

from typing import Literal, get_args

Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES: frozenset[str] = frozenset(get_args(Role))
#: Roles a Responses API message item may have (tool output comes as function_call_output items).
MESSAGE_ITEM_ROLES: frozenset[str] = ROLES - {"tool"}
