"""Schemathesis hooks for the conformance run (loaded through SCHEMATHESIS_HOOKS).

Generated requests name random models, which the gateway rightly answers with 404 and which
the schema checks then skip; replacing `model` with the served model makes the generated
requests reach the engine, so responses are checked against the schema for real.
"""

import os

import schemathesis

MODEL = os.environ["TUNEGATE_MODEL"]

# Parameters the gateway refuses on purpose with 400 unsupported_parameter (audio, logit
# bias, repetition penalties, fill-in-the-middle, best_of), and generated tool lists (nearly
# always invalid definitions, so 400s). Nearly every generated body carries one, so without
# dropping them the run would hardly reach the engine; refusals and tool calls are covered by
# the Rust tests.
REFUSED = ("tools", "functions", "audio", "logit_bias",
           "frequency_penalty", "presence_penalty", "suffix", "best_of",
           # Responses API features the gateway refuses by design (see the README).
           "background", "conversation", "prompt", "include")


@schemathesis.hook
def map_case(context, case):
    # map_case runs in every phase (examples, coverage, fuzzing); map_body does not.
    body = case.body
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = MODEL
        for key in REFUSED:
            body.pop(key, None)
        # Generated JSON schemas mostly exercise the grammar engine's refusals (tested in
        # tests/api/structured.rs); text and json_object formats go through.
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in ("text", "json_object"):
            body.pop("response_format", None)
        text = body.get("text")
        if isinstance(text, dict) and isinstance(text.get("format"), dict) and text["format"].get("type") not in ("text", "json_object"):
            text.pop("format", None)
        # Streams are checked by stream_conformance.py instead. For chat, the spec's
        # text/event-stream schema describes each event's JSON `data`, while schemathesis 4
        # validates the SSE event object itself ({"data": "...", "event": ...}) against it, so
        # no OpenAI-shaped stream, OpenAI's own included, can pass; for the legacy completions
        # endpoint the trimmed spec documents no text/event-stream at all.
        body.pop("stream", None)
        body.pop("stream_options", None)
        # The schema types `embedding` as a float array only, while base64 (what the SDKs
        # ask for) is a string at OpenAI as here; the SDK tests decode it.
        if body.get("encoding_format") == "base64":
            body.pop("encoding_format")
    # `GET /responses/{id}?stream=true` replays a background response's events; none here.
    query = case.query
    if isinstance(query, dict):
        query.pop("stream", None)
    params = case.path_parameters
    if isinstance(params, dict) and "model" in params:
        params["model"] = MODEL
    return case
