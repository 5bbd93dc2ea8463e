"""Structured outputs and tools through the client libraries' own defaults: LangChain
(`with_structured_output` in its default and function-calling methods, `bind_tools` with a
forced tool) and pydantic-ai (an Agent with a structured `output_type`, by its default tool
output and by `NativeOutput`, i.e. a json_schema response format). The test model is random:
only the gateway's grammar makes the answers valid, which is what is checked.

Environment as for test_openai_sdk.py. Prints one line per check and `N passed, N failed`.
"""

import json
import os
from typing import Literal

import checks

from pydantic import BaseModel

BASE_URL = os.environ["TUNEGATE_BASE_URL"]
MODEL = os.environ["TUNEGATE_MODEL"]
KEY = os.environ.get("TUNEGATE_API_KEY") or "not-needed"
PROMPT = "Is 'win money now' spam?"


class Verdict(BaseModel):
    spam: bool
    label: Literal["spam", "ham"]


def langchain_model(**kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=BASE_URL, api_key=KEY, temperature=0, max_tokens=200, max_retries=0, **kw)


def check_langchain_with_structured_output():
    for method in (None, "function_calling"):
        llm = langchain_model()
        structured = llm.with_structured_output(Verdict) if method is None else llm.with_structured_output(Verdict, method=method)
        v = structured.invoke(PROMPT)
        assert isinstance(v, Verdict), (method, v)
    # On the Responses API too.
    v = langchain_model(use_responses_api=True).with_structured_output(Verdict).invoke(PROMPT)
    assert isinstance(v, Verdict), v


def check_langchain_bind_tools():
    def lamp(on: bool) -> str:
        """Switch the lamp on or off."""
        return "ok"

    msg = langchain_model().bind_tools([lamp], tool_choice="lamp").invoke("Light on, please.")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "lamp", msg
    assert isinstance(msg.tool_calls[0]["args"]["on"], bool), msg.tool_calls
    # `auto` (LangChain's default): text or a valid call, never an error.
    auto = langchain_model().bind_tools([lamp]).invoke("Light on, please.")
    assert isinstance(auto.text, str) or auto.tool_calls, auto


def check_pydantic_ai_output_types():
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=BASE_URL, api_key=KEY))
    settings = ModelSettings(max_tokens=200, temperature=0)
    for output_type in (Verdict, NativeOutput(Verdict)):
        agent = Agent(model, output_type=output_type, model_settings=settings, retries=0)
        result = agent.run_sync(PROMPT)
        assert isinstance(result.output, Verdict), (output_type, result.output)
        assert json.loads(result.output.model_dump_json())["label"] in ("spam", "ham")


def main():
    checks.run(globals())


if __name__ == "__main__":
    main()
