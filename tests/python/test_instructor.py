"""instructor (structured outputs from a pydantic model) in the modes it offers for an
OpenAI-compatible server: TOOLS (its default: a forced function call), TOOLS_STRICT, JSON
(a `json_object` response format, the schema in the system prompt), JSON_SCHEMA (a
`json_schema` response format), and a streamed partial object in TOOLS mode (OpenAI's
`delta.tool_calls` chunks). The test model is random: only the gateway's grammar makes the
answers valid, which is what is checked.

instructor pins `jiter<0.15`, which the `openai` SDK of the main venv does not allow, so it
runs from its own venv (`tests/python/requirements-instructor.txt`, `.venv-instructor`).
Environment as for test_openai_sdk.py.
"""

import os
from typing import Literal

import checks
import instructor
from openai import OpenAI
from pydantic import BaseModel, ConfigDict

BASE_URL = os.environ["TUNEGATE_BASE_URL"]
MODEL = os.environ["TUNEGATE_MODEL"]
KEY = os.environ.get("TUNEGATE_API_KEY") or "not-needed"
MESSAGES = [{"role": "user", "content": "Is 'win money now' spam?"}]
SEED = 1


class Verdict(BaseModel):
    spam: bool
    label: Literal["spam", "ham"]


class Note(BaseModel):
    """JSON mode only asks for *a* JSON object; this one accepts any."""

    model_config = ConfigDict(extra="allow")


def client(mode):
    return instructor.from_openai(OpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0), mode=mode)


def ask(mode, response_model, **kw):
    return client(mode).chat.completions.create(
        model=MODEL, messages=MESSAGES, response_model=response_model, max_retries=0, max_tokens=200, temperature=0, **kw
    )


def check_tools_mode_is_the_default():
    v = instructor.from_openai(OpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0)).chat.completions.create(
        model=MODEL, messages=MESSAGES, response_model=Verdict, max_retries=0, max_tokens=200, temperature=0
    )
    assert isinstance(v, Verdict), v
    assert v.label in ("spam", "ham")


def check_tools_strict():
    assert isinstance(ask(instructor.Mode.TOOLS_STRICT, Verdict), Verdict)


def check_json_schema_mode():
    v, completion = client(instructor.Mode.JSON_SCHEMA).chat.completions.create_with_completion(
        model=MODEL, messages=MESSAGES, response_model=Verdict, max_retries=0, max_tokens=200, temperature=0
    )
    assert isinstance(v, Verdict), v
    assert completion.choices[0].finish_reason == "stop", completion


def check_json_mode():
    # Any JSON object is valid here, and a random model may write one until `max_tokens`:
    # sampled, with a seed, it closes the object.
    v = client(instructor.Mode.JSON).chat.completions.create(
        model=MODEL, messages=MESSAGES, response_model=Note, max_retries=0, max_tokens=256, temperature=1, seed=SEED
    )
    assert isinstance(v, Note), v


def check_streamed_partial_object():
    partials = list(
        client(instructor.Mode.TOOLS).chat.completions.create_partial(
            model=MODEL, messages=MESSAGES, response_model=Verdict, max_retries=0, max_tokens=200, temperature=0
        )
    )
    assert len(partials) > 1, partials
    final = partials[-1]
    assert final.label in ("spam", "ham") and isinstance(final.spam, bool), final


def main():
    checks.run(globals())


if __name__ == "__main__":
    main()
