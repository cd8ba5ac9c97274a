"""Extracts the OpenAI response schemas the tests validate against, from OpenAI's openapi.yaml.

Usage: python tools/extract_openai_schemas.py ../shared/openai-openapi/openapi.yaml tests/data/openai_schemas.json

Keeps the named schemas and everything they reference, and rewrites 3.0-style
``nullable: true`` into JSON-Schema type unions so a 2020-12 validator honours it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "Response",
    "ResponseStreamEvent",
]


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            if "type" in node:
                types = node["type"] if isinstance(node["type"], list) else [node["type"]]
                node["type"] = [*types, "null"]
                if "enum" in node and None not in node["enum"]:
                    node["enum"] = [*node["enum"], None]
            elif "$ref" in node or "allOf" in node or "oneOf" in node or "anyOf" in node:
                node = {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


def main(source: str, target: str) -> None:
    with open(source) as f:
        schemas = yaml.safe_load(f)["components"]["schemas"]
    keep: dict[str, Any] = {}
    pending = list(ROOTS)
    while pending:
        name = pending.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]
        pending.extend(_refs(schemas[name]) - keep.keys())
    with open(target, "w") as f:
        json.dump({"components": {"schemas": _nullable(keep)}}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
