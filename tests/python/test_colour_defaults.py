"""Fine-tuning with the product's defaults on a small file, as a new user would (issue 14).

The official `openai` SDK uploads 48 lines (8 distinct colour-name -> hex-code pairs, each
repeated 6 times, sharing a ~250-token system prompt) and creates a job with no
hyperparameters at all. The job must report the values its `auto` rule chose, train on all
8 distinct examples (too few to hold any out: the events say the gate scored in-sample), and
the fine-tuned model must then answer at least 6 of the 8 colours without the system prompt.
Run by tests/api/real_model.rs against the real default model, with TUNEGATE_BASE_URL,
TUNEGATE_MODEL and TUNEGATE_API_KEY. Prints one line per colour.
"""

import io
import json
import os
import sys
import time

import openai

COLOURS = [
    ("red", "#FF0000"), ("green", "#008000"), ("blue", "#0000FF"), ("yellow", "#FFFF00"),
    ("orange", "#FFA500"), ("purple", "#800080"), ("black", "#000000"), ("white", "#FFFFFF"),
]

SYSTEM = (
    "You are a colour-code service used by a design tool. The user sends the English name of one "
    "colour, in lower case, with nothing else. You answer with the colour's hexadecimal code as "
    "used in CSS and HTML: a hash sign followed by exactly six upper-case hexadecimal digits, two "
    "for red, two for green and two for blue, in that order. Do not write the colour's name, do "
    "not explain, do not add punctuation, quotes, spaces or a newline, and never answer with "
    "three-digit short forms, rgb() notation or lower-case letters. Use the CSS named-colour "
    "table, where for example navy is #000080, teal is #008080, silver is #C0C0C0, maroon is "
    "#800000, olive is #808000, lime is #00FF00, aqua is #00FFFF and fuchsia is #FF00FF. If the "
    "name is not a CSS named colour, answer with the closest named colour's code. The tool parses "
    "your answer with a strict regular expression, so any other text makes the request fail and "
    "the designer sees an error. Examples: 'gray' -> #808080, 'navy' -> #000080, 'teal' -> #008080."
)


def main() -> int:
    client = openai.OpenAI(base_url=os.environ["TUNEGATE_BASE_URL"], api_key=os.environ["TUNEGATE_API_KEY"])
    model = os.environ["TUNEGATE_MODEL"]
    lines = [
        json.dumps({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": name},
            {"role": "assistant", "content": code},
        ]})
        for _ in range(6)
        for name, code in COLOURS
    ]
    assert len(lines) == 48
    f = client.files.create(file=("colours.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=model, training_file=f.id)
    assert job.hyperparameters.n_epochs == "auto", job.hyperparameters
    started = time.time()
    deadline = started + float(os.environ.get("TUNEGATE_JOB_TIMEOUT", "1500"))
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        assert time.time() < deadline, "the job did not finish in time"
        time.sleep(1)
    events = [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=1000).data)]
    print("\n".join(m for m in events if not m.startswith("step ")))
    print(f"job: {job.status} in {time.time() - started:.0f} s, hyperparameters {job.hyperparameters}")
    assert job.status == "succeeded", job.error
    # The auto rule's choice is reported as numbers.
    assert isinstance(job.hyperparameters.n_epochs, int) and job.hyperparameters.n_epochs > 1, job.hyperparameters
    assert any("dataset: 8 train" in m and "40 duplicates removed" in m for m in events), events
    assert any("in-sample" in m for m in events), events

    right = 0
    for name, code in COLOURS:
        reply = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[{"role": "user", "content": name}],
            temperature=0,
            max_tokens=12,
        )
        answer = (reply.choices[0].message.content or "").strip()
        ok = answer.upper() == code
        right += ok
        print(f"{name:>7} -> {answer!r:14} {'ok' if ok else 'want ' + code}")
    print(f"{right} of {len(COLOURS)} colours right without the system prompt")
    assert right >= 6, f"only {right} of 8 colours right"
    return 0


if __name__ == "__main__":
    sys.exit(main())
