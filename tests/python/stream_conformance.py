"""Streamed chat chunks and Responses API events checked against OpenAI's own schema.

schemathesis cannot check OpenAI-style streams (see schemathesis_hooks.py), so this reads
streams from the gateway directly and validates every `data:` payload against
CreateChatCompletionStreamResponse from openapi.json, for a few request shapes (usage chunk,
n > 1, logprobs, stop), and every `/responses` event against ResponseStreamEvent (text,
logprobs, json_schema, a function call). Environment as for test_openai_sdk.py. Prints
`N passed, N failed`.
"""

import copy
import json
import os
import sys
import traceback

import urllib.request

import jsonschema_rs

BASE_URL = os.environ["TUNEGATE_BASE_URL"]
MODEL = os.environ["TUNEGATE_MODEL"]
KEY = os.environ.get("TUNEGATE_API_KEY") or "not-needed"
SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")


def json_schema(node):
    """OpenAPI's `nullable: true` (kept in parts of this 3.1 document) as plain JSON Schema."""
    if isinstance(node, list):
        return [json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = node["enum"] + [None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


def validator(name="CreateChatCompletionStreamResponse"):
    with open(SPEC) as f:
        spec = json.load(f)
    schema = {
        "$ref": f"#/components/schemas/{name}",
        "components": json_schema(copy.deepcopy(spec["components"])),
    }
    return jsonschema_rs.Draft202012Validator(schema)


def stream(body, path="/chat/completions"):
    req = urllib.request.Request(
        f"{BASE_URL}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    payloads = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200, r.status
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        for raw in r:
            line = raw.decode("utf-8").rstrip("\n")
            if line.startswith("data: "):
                payloads.append(line[len("data: "):])
    return payloads


def main():
    v = validator()
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    cases = {
        "plain": {},
        "include_usage": {"stream_options": {"include_usage": True}},
        "n=2": {"n": 2, "temperature": 1.0, "seed": 3},
        "logprobs": {"logprobs": True, "top_logprobs": 2},
        "stop": {"stop": ["e"]},
    }
    failed = 0
    for name, extra in cases.items():
        try:
            payloads = stream({"model": MODEL, "messages": messages, "max_tokens": 12, "stream": True, **extra})
            assert payloads[-1] == "[DONE]", payloads[-1]
            for p in payloads[:-1]:
                chunk = json.loads(p)
                errors = [e.message for e in v.iter_errors(chunk)]
                assert not errors, (errors, chunk)
            print(f"ok   {name} ({len(payloads) - 1} chunks valid)")
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    ev = validator("ResponseStreamEvent")
    lamp = {"type": "function", "name": "lamp", "strict": True, "parameters": {"type": "object",
            "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    responses = {
        "responses plain": {"instructions": "Be brief."},
        "responses logprobs": {"top_logprobs": 2, "include": ["message.output_text.logprobs"]},
        "responses json_schema": {"text": {"format": {"type": "json_schema", "name": "v", "schema": schema, "strict": True}},
                                  "max_output_tokens": 24},
        "responses function call": {"tools": [lamp], "tool_choice": "required", "max_output_tokens": 24},
    }
    for name, extra in responses.items():
        cases[name] = extra
        try:
            body = {"model": MODEL, "input": "Tell me about the sea.", "max_output_tokens": 12, "stream": True, **extra}
            payloads = stream(body, "/responses")
            kinds = []
            for p in payloads:
                event = json.loads(p)
                kinds.append(event.get("type"))
                errors = [e.message for e in ev.iter_errors(event)]
                assert not errors, (errors, event)
            assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
            print(f"ok   {name} ({len(payloads)} events valid)")
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    print(f"{len(cases) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
