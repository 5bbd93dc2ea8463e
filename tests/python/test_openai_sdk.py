"""The gateway as an unmodified `openai` client sees it.

Environment: TUNEGATE_BASE_URL (ending in /v1), TUNEGATE_MODEL, TUNEGATE_API_KEY (optional).
Prints one line per check and a closing `N passed, N failed`; exits non-zero on a failure.
"""

import os
import time

import checks

import openai
from openai import OpenAI

BASE_URL = os.environ["TUNEGATE_BASE_URL"]
MODEL = os.environ["TUNEGATE_MODEL"]
KEY = os.environ.get("TUNEGATE_API_KEY") or "not-needed"
client = OpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0, timeout=120)
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def check_chat():
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion", r
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 12
    assert r._request_id == r.id, (r._request_id, r.id)  # x-request-id: the completion id


def check_chat_stream():
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason], finishes
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage, chunks[-1]


def check_n_and_seed():
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=7, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def check_completions():
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens <= 5


def check_models():
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids, ids
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.owned_by == "tunegate"


def check_unknown_model_raises_not_found():
    try:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert e.code == "model_not_found", e.body
        return
    raise AssertionError("no NotFoundError")


def check_bad_request_raises():
    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=-1)
    except openai.BadRequestError as e:
        assert e.code == "integer_below_min_value", e.body
        assert e.param == "max_tokens", e.body
        return
    raise AssertionError("no BadRequestError")


def check_structured_output_parse():
    """The SDK's structured-output default: `.parse()` with a pydantic model sends a strict
    json_schema and parses the answer into the model (the test model is random: only the
    gateway's grammar makes the answer valid)."""
    from enum import Enum
    from typing import List

    from pydantic import BaseModel

    class Label(str, Enum):
        spam = "spam"
        ham = "ham"

    class Verdict(BaseModel):
        label: Label
        urgent: bool
        tags: List[Label]

    r = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Verdict, max_tokens=120, temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Verdict), choice.message
    assert choice.message.parsed.label in (Label.spam, Label.ham)
    # json_object mode: the content is a JSON object.
    import json

    j = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0, response_format={"type": "json_object"},
    )
    if j.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(j.choices[0].message.content), dict), j.choices[0].message.content


def check_tool_calls():
    """A forced call through the SDK, streamed and not: `tool_calls` with JSON arguments that
    follow the function's schema, and a streamed delta the SDK accumulates."""
    import json

    tools = [{"type": "function", "function": {"name": "lamp", "parameters": {"type": "object",
              "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}}}]
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0, tools=tools, tool_choice="required")
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "lamp" and call.id.startswith("call_"), call
    assert isinstance(json.loads(call.function.arguments)["on"], bool), call
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert streamed.function.arguments == call.function.arguments, (streamed, call)


def check_wrong_key_raises_authentication_error():
    if KEY == "not-needed":
        return  # an open gateway accepts any key
    bad = OpenAI(base_url=BASE_URL, api_key="sk-wrong", max_retries=0)
    try:
        bad.models.list()
    except openai.AuthenticationError as e:
        assert e.code == "invalid_api_key", e.body
        return
    raise AssertionError("no AuthenticationError")


def check_stored_completions():
    tag = f"sdk-{time.time_ns()}"
    made = [
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"stored {i}"}],
            max_tokens=4,
            temperature=0,
            store=True,
            metadata={"run": tag},
        )
        for i in range(3)
    ]
    listed = client.chat.completions.list(metadata={"run": tag}, limit=2)
    assert len(listed.data) == 2 and listed.has_more, listed
    ids = [c.id for c in listed]  # iterating a page follows `after` across pages
    # Oldest first; completions made within the same millisecond may come in either order.
    assert sorted(ids) == sorted(c.id for c in made), (ids, [c.id for c in made])
    one = client.chat.completions.retrieve(made[0].id)
    assert one.choices[0].message.content == made[0].choices[0].message.content
    msgs = client.chat.completions.messages.list(made[1].id)
    assert [m.role for m in msgs.data] == ["system", "user"], msgs
    assert msgs.data[1].content == "stored 1"
    updated = client.chat.completions.update(made[2].id, metadata={"run": tag, "kept": "yes"})
    assert updated.metadata == {"run": tag, "kept": "yes"}, updated.metadata
    deleted = client.chat.completions.delete(made[2].id)
    assert deleted.deleted and deleted.id == made[2].id
    try:
        client.chat.completions.retrieve(made[2].id)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("a deleted completion is still retrievable")


def check_responses():
    """The Responses API as the SDK's users call it: create with instructions, the typed
    event stream (`responses.stream`) giving the same text, retrieve, input items,
    `previous_response_id` chaining and delete."""
    kw = dict(model=MODEL, instructions="You are terse.", input="Say hello.", max_output_tokens=12, temperature=0)
    r = client.responses.create(**kw)
    assert r.object == "response" and r.id.startswith("resp_"), r
    assert r.status in ("completed", "incomplete"), r
    assert r.instructions == "You are terse." and r.model == MODEL
    assert isinstance(r.output_text, str) and r.output[0].type == "message", r.output
    assert 0 < r.usage.output_tokens <= 12 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r._request_id == r.id, (r._request_id, r.id)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds, kinds
    # 12 tokens of a random model end `incomplete` (max_output_tokens), which the SDK's
    # get_final_response() refuses: the last event carries the response either way.
    final = events[-1].response
    assert final.status == r.status and final.output_text == r.output_text, (final, r.output_text)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage.output_tokens == r.usage.output_tokens
    items = client.responses.input_items.list(r.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "Say hello.", items
    nxt = client.responses.create(model=MODEL, input="And again.", previous_response_id=r.id, max_output_tokens=4, temperature=0)
    assert nxt.previous_response_id == r.id
    # The chained request carried the first exchange: more input tokens than its own turn.
    assert nxt.usage.input_tokens > r.usage.input_tokens, (nxt.usage, r.usage)
    deleted = client.responses.delete(nxt.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    try:
        client.responses.retrieve(nxt.id)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("a deleted response is still retrievable")


def check_responses_structured_and_tools():
    """`responses.parse` with a pydantic model (json_schema through `text.format`) and a
    forced function call as a `function_call` output item."""
    import json

    from pydantic import BaseModel

    from typing import Literal

    class Verdict(BaseModel):
        spam: bool
        label: Literal["spam", "ham"]

    r = client.responses.parse(model=MODEL, input="Classify: win money now", text_format=Verdict, max_output_tokens=60, temperature=0)
    assert r.status == "completed", r
    assert isinstance(r.output_parsed, Verdict), r.output
    tools = [{"type": "function", "name": "lamp", "parameters": {"type": "object",
              "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}, "strict": True}]
    t = client.responses.create(model=MODEL, input="Light on.", tools=tools, tool_choice="required", max_output_tokens=60, temperature=0)
    call = t.output[0]
    assert call.type == "function_call" and call.name == "lamp" and call.call_id.startswith("call_"), t.output
    assert isinstance(json.loads(call.arguments)["on"], bool), call
    # The tool's answer goes back as a function_call_output item on the chained response.
    after = client.responses.create(
        model=MODEL, previous_response_id=t.id, max_output_tokens=6, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "done"}],
    )
    assert after.status in ("completed", "incomplete") and after.output[0].type in ("message", "function_call"), after


def check_embeddings():
    """`embeddings.create` as RAG clients call it (the SDK asks for base64 and decodes it):
    unit vectors of one width, the same for a text alone or in a batch."""
    import math

    r = client.embeddings.create(model=MODEL, input=["The cat sat.", "Revenue rose."])
    assert r.object == "list" and len(r.data) == 2, r
    width = len(r.data[0].embedding)
    assert width > 0 and all(len(d.embedding) == width for d in r.data)
    for d in r.data:
        assert abs(math.sqrt(sum(x * x for x in d.embedding)) - 1.0) < 1e-4
    one = client.embeddings.create(model=MODEL, input="The cat sat.", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(one.data[0].embedding, r.data[0].embedding)) < 1e-4
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0


def main():
    checks.run(globals())


if __name__ == "__main__":
    main()
