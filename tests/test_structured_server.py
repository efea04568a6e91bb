"""Structured output over beastserve.v1 and the Python client: constrained outputs come back valid, and bad input
for each new field is INVALID_ARGUMENT naming it (the client refuses what it can check before sending)."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest

from server.client import build_request
from server.proto.beastserve.v1 import generate_pb2 as pb
from tests.daemon import generation_stub, serve_for_module


@pytest.fixture(scope="module")
def daemon(tiny_text_model_dir, tmp_path_factory):
    path, _ = tiny_text_model_dir
    yield from serve_for_module(path, tmp_path_factory)


@pytest.fixture(scope="module")
def stub(daemon):
    yield from generation_stub(daemon)


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                            "ok": {"type": "boolean"}}, "required": ["n", "ok"]}

# The tag's own whitespace limit: without one a random-weight model may write blanks inside the JSON until the
# length limit (beastserve's own JSON schemas are compact; a structural tag is served as the client wrote it).
ANSWER_TAG = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>", "end": "</answer>", "content": {
    "type": "json_schema", "json_schema": SCHEMA, "max_whitespace_cnt": 1}}}


@pytest.mark.parametrize("so, valid", [
    ({"json": json.dumps(SCHEMA)}, lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
    ({"regex": "[a-c]{3}-[0-9]"}, lambda text: re.fullmatch("[a-c]{3}-[0-9]", text)),
    ({"choice": ["left", "right"]}, lambda text: text in ("left", "right")),
    ({"grammar": 'root ::= "x" ("y" | "z")'}, lambda text: text in ("xy", "xz")),
    ({"structural_tag": ANSWER_TAG}, lambda text: text.startswith("<answer>") and text.endswith("</answer>")
     and jsonschema.validate(json.loads(text.removeprefix("<answer>").removesuffix("</answer>")), SCHEMA) is None),
], ids=["json", "regex", "choice", "grammar", "structural_tag"])
def test_constrained_outputs_come_back_valid(stub, so, valid):
    # A random-weight model writes nonsense, so only the grammar makes these hold.
    request = build_request("Answer:", max_tokens=48, temperature=0, structured_outputs=so)
    response = stub.Generate(request)
    assert response.finish_reason == pb.FINISH_REASON_STOP and valid(response.text), response.text


BAD = [
    (pb.StructuredOutputs(), "structured_outputs"),
    (pb.StructuredOutputs(json="{not json"), "structured_outputs.json"),
    (pb.StructuredOutputs(json='{"type": "frog"}'), "structured_outputs.json"),
    (pb.StructuredOutputs(json_object=False), "structured_outputs.json_object"),
    (pb.StructuredOutputs(regex="(a"), "structured_outputs.regex"),
    (pb.StructuredOutputs(regex=""), "structured_outputs.regex"),
    (pb.StructuredOutputs(choice=pb.Choices()), "structured_outputs.choice"),
    (pb.StructuredOutputs(choice=pb.Choices(choices=["a", ""])), "structured_outputs.choice"),
    (pb.StructuredOutputs(grammar="root ::= missing"), "structured_outputs.grammar"),
    (pb.StructuredOutputs(structural_tag="[1]"), "structured_outputs.structural_tag"),
    (pb.StructuredOutputs(structural_tag='{"type": "structural_tag", "format": {"type": "frog"}}'),
     "structured_outputs.structural_tag"),
]


@pytest.mark.parametrize("so, named", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_the_field(stub, so, named):
    request = pb.GenerateRequest(text="Hi", structured_outputs=so)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{named}: "), info.value.details()


@pytest.mark.parametrize("so, named", [
    ({"choice": []}, "structured_outputs.choice"), ({"json": "[1]"}, "structured_outputs.json"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"), ({"pattern": "a"}, "structured_outputs"),
    ({"structural_tag": "{not json"}, "structured_outputs.structural_tag"),
])
def test_the_client_refuses_what_it_can_check_naming_the_field(so, named):
    with pytest.raises(ValueError, match=f"^{re.escape(named)}: "):
        build_request("Hi", structured_outputs=so)


def test_the_client_maps_each_kind_onto_the_proto():
    choice = build_request("Hi", structured_outputs={"choice": ["a", "b"]}).structured_outputs
    assert list(choice.choice.choices) == ["a", "b"]
    schema = build_request("Hi", structured_outputs={"json": SCHEMA}).structured_outputs
    assert json.loads(schema.json) == SCHEMA
    assert build_request("Hi", structured_outputs={"json_object": True}).structured_outputs.json_object
    tag = build_request("Hi", structured_outputs={"structural_tag": ANSWER_TAG}).structured_outputs
    assert json.loads(tag.structural_tag) == ANSWER_TAG
