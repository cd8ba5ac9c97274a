"""``GET /openapi.json``: an OpenAPI 3.1 description of every route the facade serves."""

from __future__ import annotations

from typing import Any

from aiohttp import web

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
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "name": {"type": "string"},
    },
}
_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
            },
        },
    },
}
_RESPONSE_FORMAT = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "schema": {"type": "object"}}},
    },
}
_SAMPLING = {
    "model": {"type": "string"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": "integer"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "n": {"type": "integer", "minimum": 1},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
    "top_k": {"type": "integer"},
    "min_p": {"type": "number"},
    "repetition_penalty": {"type": "number"},
    "typical_p": {"type": "number"},
    "ignore_eos": {"type": "boolean"},
    "min_tokens": {"type": "integer"},
}
_SCHEMAS: dict[str, Any] = {
    "Error": _ERROR,
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            **_SAMPLING,
            "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            "tools": {"type": "array", "items": _TOOL},
            "tool_choice": {
                "oneOf": [
                    {"enum": ["none", "auto", "required"]},
                    {"type": "string", "description": "a tool's name (as TGI accepts)"},
                    {
                        "type": "object",
                        "required": ["type", "function"],
                        "properties": {"type": {"const": "function"}, "function": {"type": "object"}},
                    },
                ]
            },
            "parallel_tool_calls": {"type": "boolean"},
            "response_format": _RESPONSE_FORMAT,
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["prompt"],
        "properties": {**_SAMPLING, "prompt": {}, "echo": {"type": "boolean"}, "logprobs": {"type": "integer"}},
    },
    "CreateResponse": {
        "type": "object",
        "required": ["input"],
        "properties": {
            "model": {"type": "string"},
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
            "instructions": {"type": "string"},
            "max_output_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "stream": {"type": "boolean"},
            "tools": {"type": "array", "items": {"type": "object"}},
            "tool_choice": {"oneOf": [{"type": "string"}, {"type": "object"}]},
            "parallel_tool_calls": {"type": "boolean"},
            "text": {"type": "object", "properties": {"format": {"type": "object"}}},
            "previous_response_id": {"type": "string"},
            "store": {"type": "boolean"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "seed": {"type": "integer"},
        },
    },
    "GenerateRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {"inputs": {"type": "string"}, "parameters": {"type": "object"}, "stream": {"type": "boolean"}},
    },
}

_ROUTES: list[tuple[str, str, str, str | None]] = [
    ("post", "/v1/chat/completions", "OpenAI chat completion (SSE when stream is true)", "ChatCompletionRequest"),
    ("post", "/v1/completions", "OpenAI text completion (SSE when stream is true)", "CompletionRequest"),
    ("post", "/v1/responses", "OpenAI Responses API (typed SSE events when stream is true)", "CreateResponse"),
    ("get", "/v1/responses/{response_id}", "A stored response (kept in memory, RESPONSES_STORE_SIZE)", None),
    ("delete", "/v1/responses/{response_id}", "Forget a stored response", None),
    ("get", "/v1/models", "The served model, as OpenAI and vLLM list it", None),
    ("get", "/v1/models/{model}", 'The served model by name (its id, or "tgi")', None),
    (
        "post",
        "/tokenize",
        "Token ids of a prompt or chat (vLLM's shape), or TGI's {inputs} -> [{id, text, start, stop}]",
        None,
    ),
    ("post", "/detokenize", "Text of token ids (vLLM's shape)", None),
    ("post", "/generate", "TGI: generate text", "GenerateRequest"),
    ("post", "/generate_stream", "TGI: generate text as server-sent events", "GenerateRequest"),
    ("post", "/", "TGI compat: /generate, or /generate_stream when stream is true", "GenerateRequest"),
    ("get", "/info", "TGI: what is served and with which limits", None),
    ("get", "/health", "200 once the shards are loaded and warm, 503 before", None),
    ("get", "/metrics", "Prometheus metrics of the facade and router", None),
    ("get", "/openapi.json", "This document", None),
    ("get", "/", "The playground: a chat page with streaming, sampling, JSON-schema and tool controls", None),
    ("get", "/docs", "Swagger UI over this document", None),
]


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
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Switchyard", "version": "0.1.0", "description": "OpenAI- and TGI-compatible LLM serving"},
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(document())
