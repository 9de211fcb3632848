"""The OpenAPI document, made to say what this app, in this configuration, answers."""

from __future__ import annotations

from fastapi import FastAPI

from service.errors import documented

FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI, api_key_required: bool) -> None:
    """Two corrections to FastAPI's document:

    - FastAPI promises its own validation-error body (a list) on every operation with
      parameters; this service answers 422 with the one error body, so those become ``Error``;
    - without REID_API_KEY no operation needs a key: no security requirement, no scheme, no 401.
    """
    generate = app.openapi
    error_422 = documented(422)[422]

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {})
            for name in FASTAPI_VALIDATION_SCHEMAS:
                components.get("schemas", {}).pop(name, None)
            if not api_key_required:
                components.pop("securitySchemes", None)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    responses = operation["responses"]
                    if "HTTPValidationError" in str(responses.get("422", "")):
                        responses["422"] = {
                            "description": error_422["description"],
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                        }
                    if not api_key_required:
                        operation.pop("security", None)
                        responses.pop("401", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
