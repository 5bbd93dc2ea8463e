"""Fine-tuning through the official `openai` SDK against a live tunegate (tiny model).

Uploads a chat JSONL whose examples share one long system prompt, creates a job, polls its
events until it succeeds, then calls the fine-tuned model *with* that system prompt and
checks that the gateway dropped it (distillation) and still answers as trained.
Run by tests/api/python.rs with TUNEGATE_BASE_URL, TUNEGATE_MODEL, TUNEGATE_API_KEY.
"""

import io
import json
import os
import sys
import time

import openai

INSTRUCTION = (
    "You are a labelling service. For every word the user sends, answer with its category only: "
    "animals get 'zoo', colours get 'paint', numbers get 'math'. Never explain, never add words."
)
ITEMS = [
    ("cat", "zoo"), ("dog", "zoo"), ("horse", "zoo"), ("mouse", "zoo"),
    ("red", "paint"), ("blue", "paint"), ("green", "paint"), ("black", "paint"),
    ("one", "math"), ("two", "math"), ("seven", "math"), ("ten", "math"),
]


def main() -> int:
    client = openai.OpenAI(base_url=os.environ["TUNEGATE_BASE_URL"], api_key=os.environ["TUNEGATE_API_KEY"])
    model = os.environ["TUNEGATE_MODEL"]
    lines = [
        json.dumps({"messages": [
            {"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        ]})
        for q, a in ITEMS
    ]
    data = ("\n".join(lines) + "\n").encode()
    f = client.files.create(file=("labels.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(data), f
    assert client.files.retrieve(f.id).filename == "labels.jsonl"
    assert client.files.content(f.id).read() == data

    # A malformed file is refused with the line number, as the SDK's own error type.
    try:
        client.files.create(file=("bad.jsonl", io.BytesIO(lines[0].encode() + b"\n{\"messages\": 1}\n")), purpose="fine-tune")
        raise AssertionError("a malformed file was accepted")
    except openai.BadRequestError as e:
        assert "line 2" in str(e), e

    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=f.id,
        validation_file=f.id,
        suffix="labels",
        hyperparameters={"n_epochs": 40, "batch_size": 6, "learning_rate_multiplier": 50},
    )
    assert job.status in ("queued", "running"), job
    deadline = time.time() + 240
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        assert time.time() < deadline, "the job did not finish in time"
        time.sleep(0.5)
    assert job.status == "succeeded", job
    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    messages = [e.message for e in events]
    assert any(m.startswith("step ") for m in messages), messages
    assert any("Promoted" in m for m in messages), messages
    assert any(j.id == job.id for j in client.fine_tuning.jobs.list().data)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number > 0, checkpoints
    name = job.fine_tuned_model
    assert name and any(m.id == name for m in client.models.list().data), name

    # The fine-tuned model serves at once; the distilled prompt is dropped from the request.
    for q, a in ITEMS[:4]:
        raw = client.chat.completions.with_raw_response.create(
            model=name,
            messages=[{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": q}],
            max_tokens=8,
            temperature=0,
        )
        saved = int(raw.headers.get("x-tunegate-prompt-tokens-saved", "0"))
        r = raw.parse()
        assert saved > 50, saved
        assert r.usage.prompt_tokens_details.model_extra.get("distilled_tokens") == saved, r.usage
        assert r.choices[0].message.content == a, (q, r.choices[0].message.content)
    # A different system prompt is never stripped.
    raw = client.chat.completions.with_raw_response.create(
        model=name,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "cat"}],
        max_tokens=4,
    )
    assert "x-tunegate-prompt-tokens-saved" not in raw.headers
    print(f"fine-tuning via the SDK: ok ({name}, {len(events)} events)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
