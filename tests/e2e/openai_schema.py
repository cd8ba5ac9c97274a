"""Validation of responses against OpenAI's own OpenAPI schemas (see tests/data/OPENAI_SCHEMAS_SOURCE.md)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_DOCUMENT = Path(__file__).resolve().parent.parent / "data" / "openai_schemas.json"


@cache
def _registry() -> tuple[dict, Registry]:
    document = json.loads(_DOCUMENT.read_text())
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    return document, Registry().with_resource("urn:openai", resource)


def validate(schema_name: str, instance: Any) -> None:
    """Raises jsonschema.ValidationError if ``instance`` does not match OpenAI's ``schema_name``."""
    _document, registry = _registry()
    schema = {"$ref": f"urn:openai#/components/schemas/{schema_name}"}
    Draft202012Validator(schema, registry=registry).validate(instance)
