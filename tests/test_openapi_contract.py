"""The HTTP contract is the OpenAPI document: a fuzzer generates requests from the running
service's own /openapi.json and checks every answer against it; and the document itself
promises one error shape, the API-key scheme, and nothing FastAPI answers by default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service_support import ServiceProcess, files, jpeg, person_crop, seed_onnx_cache

API_KEY = "fuzz-key"
# Fixed, so that a failure reproduces; small enough to keep the suite fast (~10 s).
SEED, EXAMPLES = 20261124, 25


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory, served_checkpoint):
    checkpoint, template = served_checkpoint
    data = tmp_path_factory.mktemp("fuzz") / "data"
    data.mkdir()
    seed_onnx_cache(template, data)
    service = ServiceProcess(checkpoint, data, api_key=API_KEY).start()
    with service.client(headers={"X-API-Key": API_KEY}) as c:
        assert c.post("/gallery", data={"identity": "alice"}, files=files(jpeg(person_crop(0)))).status_code == 201
    yield service
    service.stop()


def test_fuzzing_from_the_services_own_openapi_finds_no_failure(keyed_service, tmp_path):
    """Every check but positive-data acceptance (random bytes are not an image): no server error,
    every status and header documented, every body matching its schema, 405 with the right
    Allow, invalid input refused, the API key enforced."""
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{keyed_service.url}/openapi.json",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--seed", str(SEED), "--max-examples", str(EXAMPLES), "--workers", "1",
         "--header", f"X-API-Key: {API_KEY}", "--request-timeout", "30"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "generated" in result.stdout and "Seed: " in result.stdout


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> dict[str, dict]:
    """The document with and without REID_API_KEY (generated without loading a model)."""
    tmp = tmp_path_factory.mktemp("openapi")
    found = {}
    for name, key in (("keyed", API_KEY), ("open", None)):
        with TestClient(create_app(Settings(data_dir=tmp, api_key=key))) as c:
            found[name] = c.get("/openapi.json").json()
    return found


def operations(document: dict):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def test_every_error_answer_is_documented_with_the_one_error_schema(documents):
    text = json.dumps(documents)
    assert "HTTPValidationError" not in text and "ValidationError" not in text
    error = documents["keyed"]["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"detail", "code"}
    for name, operation in operations(documents["keyed"]):
        for status, response in operation["responses"].items():
            if int(status) < 400 or name == "GET /readyz":  # readiness answers its own state
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, (name, status)
            if status == "503":
                assert "Retry-After" in response["headers"], name


def test_each_route_documents_the_statuses_it_can_answer(documents):
    statuses = {name: set(op["responses"]) for name, op in operations(documents["keyed"])}
    uploads = {"400", "413", "415", "422", "503", "504"}
    assert statuses["POST /embed"] == {"200"} | uploads
    assert statuses["POST /query"] == {"200"} | uploads
    assert statuses["POST /gallery"] == {"201", "401"} | uploads
    assert statuses["DELETE /gallery/{identity}"] >= {"204", "401", "404", "503"}
    assert statuses["GET /query"] == {"200", "404", "422", "503"}


def test_the_api_key_is_a_security_scheme_on_the_mutations_only_when_configured(documents):
    keyed, open_ = documents["keyed"], documents["open"]
    assert keyed["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": keyed["components"]["securitySchemes"]["APIKeyHeader"]["description"],
    }
    secured = {name for name, op in operations(keyed) if op.get("security")}
    assert secured == {"POST /gallery", "DELETE /gallery/{identity}"}
    assert "securitySchemes" not in open_["components"]
    assert not [name for name, op in operations(open_) if op.get("security") or "401" in op["responses"]]


def test_405_lists_every_method_of_the_path_in_allow(documents, tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path))) as c:
        for path, allowed in (("/gallery", "GET, POST"), ("/gallery/alice", "DELETE, GET"), ("/query", "GET, POST")):
            r = c.put(path)
            assert r.status_code == 405 and r.headers["allow"] == allowed, path
            assert r.json() == {"detail": f"PUT is not allowed on {path}", "code": "method_not_allowed"}
        r = c.get("/nowhere")
        assert r.status_code == 404 and r.json() == {"detail": "nothing at /nowhere", "code": "not_found"}


def test_malformed_multipart_is_a_documented_400(keyed_service):
    with keyed_service.client() as c:
        r = c.post("/embed", content=b"--x\r\nnot a part", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 400 and r.json()["code"] == "malformed_body"
    assert r.json()["detail"].startswith("malformed request body")
