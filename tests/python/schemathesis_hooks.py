"""Schemathesis hooks for the conformance run (loaded through SCHEMATHESIS_HOOKS).

Generated bodies name random models, which the gateway rightly answers with 404 and which
the schema checks then skip; replacing `model` with the served model makes the generated
requests reach the engine, so responses are checked against the schema for real.
"""

import os

import schemathesis

MODEL = os.environ["TUNEGATE_MODEL"]


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = MODEL
        # The trimmed spec documents only application/json for the legacy completions
        # endpoint, though OpenAI (and tunegate) stream it as text/event-stream; chat's
        # streaming is documented and stays in.
        if context.operation is not None and context.operation.path == "/completions":
            body.pop("stream", None)
            body.pop("stream_options", None)
    return body


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    if isinstance(path_parameters, dict) and "model" in path_parameters:
        path_parameters["model"] = MODEL
    return path_parameters
