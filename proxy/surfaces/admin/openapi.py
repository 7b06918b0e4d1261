"""The admin API as OpenAPI 3.1, made from the models that validate its requests and shape its answers."""

from __future__ import annotations

import functools
import re
from http import HTTPStatus
from importlib.metadata import version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from proxy.surfaces.admin.requests import Operation
from proxy.surfaces.admin_models import Error

JSON = "application/json"


@functools.cache
def openapi_document(operations: tuple[Operation, ...]) -> dict[str, Any]:
    """The OpenAPI document of `operations`: their paths, parameters, bodies, answers and refusals."""
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(Error, "serialization")]
    for op in operations:
        pairs.append((op.answer, "serialization"))
        if op.body is not None:
            pairs.append((op.body, "validation"))
    refs, top = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        answer = refs[(op.answer, "serialization")]
        responses = {str(op.status): {"description": op.summary, "content": {JSON: {"schema": answer}}}}
        too_large = (413,) if op.body is not None else ()
        for status in (*op.errors, *too_large, 401, 503):
            error = refs[(Error, "serialization")]
            responses[str(status)] = {"description": HTTPStatus(status).phrase, "content": {JSON: {"schema": error}}}
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", op.path)
        ]
        if op.query is not None:
            properties = op.query.model_json_schema()["properties"]
            parameters += [
                {"name": name, "in": "query", "required": False, "schema": schema, "description": field.description}
                for name, field in op.query.model_fields.items()
                for schema in [properties[name]]
            ]
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op.handler.__name__.strip("_"),
            "parameters": parameters,
            "responses": responses,
        }
        if op.body is not None:
            schema = refs[(op.body, "validation")]
            operation["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
        paths.setdefault(op.path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "spendgate admin API",
            "version": version("spendgate"),
            "description": "The CLI's operations over JSON. Errors use Anthropic's error shape.",
        },
        "security": [{"admin": []}],
        "paths": paths,
        "components": {
            "schemas": top["$defs"],
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer", "description": "SPENDGATE_ADMIN_TOKEN"}},
        },
    }
