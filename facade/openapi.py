"""``GET /openapi.json``: an OpenAPI 3.1 description of every route the facade serves.

Request bodies are the JSON schemas of facade.request_models, the models the
handlers validate with: the document lists exactly what is accepted.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from facade import request_models as rm
from facade.json_body import json_response

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ROUTES: list[tuple[str, str, str, type[BaseModel] | None]] = [
    ("post", "/v1/chat/completions", "OpenAI chat completion (SSE when stream is true)", rm.ChatCompletionRequest),
    ("post", "/v1/completions", "OpenAI text completion (SSE when stream is true)", rm.CompletionRequest),
    ("post", "/v1/responses", "OpenAI Responses API (typed SSE events when stream is true)", rm.CreateResponse),
    (
        "post",
        "/v1/embeddings",
        "OpenAI embeddings of texts or token ids (the model's pooled final hidden states)",
        rm.EmbeddingRequest,
    ),
    ("get", "/v1/responses/{response_id}", "A stored response (kept in memory, RESPONSES_STORE_SIZE)", None),
    ("delete", "/v1/responses/{response_id}", "Forget a stored response", None),
    ("get", "/v1/models", "The served model and its LoRA adapters (parent: the model), as vLLM lists them", None),
    ("get", "/v1/models/{model}", 'The served model by name (its id, or "tgi"), or a LoRA adapter', None),
    (
        "post",
        "/v1/load_lora_adapter",
        "vLLM's: load a LoRA adapter (PEFT folder) at run time",
        rm.LoadLoraAdapterRequest,
    ),
    (
        "post",
        "/v1/unload_lora_adapter",
        "vLLM's: unload a LoRA adapter once its running requests are done",
        rm.UnloadLoraAdapterRequest,
    ),
    (
        "post",
        "/tokenize",
        "Token ids of a prompt or chat (vLLM's shape), or TGI's {inputs} -> [{id, text, start, stop}]",
        rm.TokenizeRequest,
    ),
    ("post", "/detokenize", "Text of token ids (vLLM's shape)", rm.DetokenizeRequest),
    ("post", "/generate", "TGI: generate text", rm.GenerateRequest),
    ("post", "/generate_stream", "TGI: generate text as server-sent events", rm.GenerateRequest),
    ("post", "/", "TGI compat: /generate, or /generate_stream when stream is true", rm.GenerateRequest),
    ("get", "/info", "TGI: what is served and with which limits", None),
    ("get", "/health", "200 once the shards are loaded and warm, 503 before", None),
    ("get", "/metrics", "Prometheus metrics of the facade and router", None),
    ("get", "/openapi.json", "This document", None),
    ("get", "/", "The playground: a chat page with streaming, sampling, JSON-schema and tool controls", None),
    ("get", "/docs", "Swagger UI over this document", None),
]


def _request_schemas() -> dict[str, Any]:
    """Every request model's JSON schema (and the models they use), as components."""
    models = {body for *_, body in _ROUTES if body is not None}
    _, top = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    schemas = dict(top["$defs"])
    for name, schema in schemas.items():
        # The models let extra fields through so that the parsers can name them; a request
        # body's unknown fields are then refused (400), a nested object's are ignored.
        schema.pop("additionalProperties", None)
        if name in {m.__name__ for m in models}:
            schema["additionalProperties"] = False
    return schemas


@cache
def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, summary, body in _ROUTES:
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "Success"},
                "default": {
                    "description": "An OpenAI-shaped error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
        }
        if body:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}},
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Switchyard", "version": "0.1.0", "description": "OpenAI- and TGI-compatible LLM serving"},
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR, **_request_schemas()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(document())
