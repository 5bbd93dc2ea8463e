#!/usr/bin/env python3
"""Tool-list distillation, as users would run it: a smart-home assistant whose prompt is
mostly tool definitions (24 functions, well over 1,500 tokens with the system prompt),
fine-tuned with the product's defaults from an OpenAI-format file (`tools` beside the
messages, the gold call as the assistant's `tool_calls`), then the base model with the
tools against the adapter on held-out requests. The client sends the same request to both
(system prompt, tools, `tool_choice`); for the adapter the router drops the prompt and the
tools, which it absorbed. Scored by exact match of the call (function and arguments).

    cargo build --release --bin tunegate
    python3 benches/flywheel/tools.py [--train 300 --held-out 60]

Writes benches/results/tools.md and tools.json. The data are generated from templates
(seeded), so the task is learnable and its gold calls are unambiguous.
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as fw  # noqa: E402
import suite  # noqa: E402

REPO = HERE.parent.parent
SYSTEM = "You are the home assistant of the Miller family. Answer every request with exactly one call of one of your functions."
ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "office", "garage", "hallway", "garden"]
DOORS = ["front door", "back door", "garage door", "patio door"]
GENRES = ["jazz", "rock", "classical", "pop", "news", "podcast"]


def fn(name, description, props, required=None):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required if required is not None else list(props),
        "additionalProperties": False}}}


def room(desc="The room."):
    return {"type": "string", "enum": ROOMS, "description": desc}


TOOLS = [
    fn("set_light", "Switch the lights of one room on or off.", {"room": room(), "on": {"type": "boolean", "description": "true to switch on, false to switch off."}}),
    fn("dim_light", "Set the brightness of the lights of one room, in percent.", {"room": room(), "brightness": {"type": "integer", "minimum": 0, "maximum": 100, "description": "Brightness in percent."}}),
    fn("set_temperature", "Set the thermostat of one room, in degrees Celsius.", {"room": room(), "celsius": {"type": "integer", "minimum": 10, "maximum": 30, "description": "Target temperature."}}),
    fn("play_music", "Play a genre of music in one room.", {"room": room(), "genre": {"type": "string", "enum": GENRES, "description": "What to play."}}),
    fn("stop_music", "Stop the music in one room.", {"room": room()}),
    fn("set_volume", "Set the speaker volume of one room, 0 to 10.", {"room": room(), "level": {"type": "integer", "minimum": 0, "maximum": 10, "description": "Volume level."}}),
    fn("lock_door", "Lock or unlock a door.", {"door": {"type": "string", "enum": DOORS, "description": "Which door."}, "locked": {"type": "boolean", "description": "true to lock, false to unlock."}}),
    fn("open_blinds", "Open or close the blinds of one room.", {"room": room(), "open": {"type": "boolean", "description": "true to open, false to close."}}),
    fn("start_vacuum", "Send the robot vacuum to clean one room.", {"room": room()}),
    fn("set_alarm", "Set the morning alarm, 24-hour time.", {"hour": {"type": "integer", "minimum": 0, "maximum": 23}, "minute": {"type": "integer", "minimum": 0, "maximum": 59}}),
    fn("cancel_alarm", "Cancel the morning alarm.", {}),
    fn("water_garden", "Water the garden for some minutes.", {"minutes": {"type": "integer", "minimum": 1, "maximum": 60, "description": "How long."}}),
    fn("start_oven", "Preheat the oven, in degrees Celsius.", {"celsius": {"type": "integer", "minimum": 50, "maximum": 250, "description": "Oven temperature."}}),
    fn("stop_oven", "Switch the oven off.", {}),
    fn("start_dishwasher", "Start the dishwasher with a programme.", {"programme": {"type": "string", "enum": ["eco", "quick", "intensive"], "description": "Washing programme."}}),
    fn("start_washing_machine", "Start the washing machine at a temperature.", {"celsius": {"type": "integer", "enum": [30, 40, 60, 90], "description": "Washing temperature."}}),
    fn("arm_security", "Arm or disarm the security system.", {"armed": {"type": "boolean", "description": "true to arm, false to disarm."}}),
    fn("open_garage", "Open or close the garage.", {"open": {"type": "boolean", "description": "true to open, false to close."}}),
    fn("set_fan", "Set the ceiling fan speed of one room, 0 (off) to 3.", {"room": room(), "speed": {"type": "integer", "minimum": 0, "maximum": 3}}),
    fn("turn_tv", "Switch the television on or off.", {"on": {"type": "boolean"}}),
    fn("add_to_shopping_list", "Add an item to the shopping list.", {"item": {"type": "string", "maxLength": 30, "description": "What to buy, in lowercase."}}),
    fn("call_person", "Call a family member on the house phone.", {"person": {"type": "string", "enum": ["mum", "dad", "grandma", "grandpa", "anna", "tom"]}}),
    fn("feed_pets", "Release a portion of pet food.", {"portions": {"type": "integer", "minimum": 1, "maximum": 3}}),
    fn("report_energy", "Report the energy use of the house over a number of days.", {"days": {"type": "integer", "minimum": 1, "maximum": 30}}),
]


def examples(n, seed):
    """(user request, gold call) pairs from templates, deterministic for a seed."""
    rnd = random.Random(seed)
    makers = [
        lambda r: (f"Turn {'on' if (o := rnd.random() < .5) else 'off'} the lights in the {(x := rnd.choice(ROOMS))}.", "set_light", {"room": x, "on": o}),
        lambda r: (f"Dim the {(x := rnd.choice(ROOMS))} lights to {(b := rnd.randrange(10, 100, 10))} percent.", "dim_light", {"room": x, "brightness": b}),
        lambda r: (f"Make the {(x := rnd.choice(ROOMS))} {(c := rnd.randint(16, 26))} degrees.", "set_temperature", {"room": x, "celsius": c}),
        lambda r: (f"Play some {(g := rnd.choice(GENRES))} in the {(x := rnd.choice(ROOMS))}.", "play_music", {"room": x, "genre": g}),
        lambda r: (f"Stop the music in the {(x := rnd.choice(ROOMS))}.", "stop_music", {"room": x}),
        lambda r: (f"Volume {(v := rnd.randint(0, 10))} in the {(x := rnd.choice(ROOMS))}.", "set_volume", {"room": x, "level": v}),
        lambda r: (f"{'Lock' if (l := rnd.random() < .5) else 'Unlock'} the {(d := rnd.choice(DOORS))}.", "lock_door", {"door": d, "locked": l}),
        lambda r: (f"{'Open' if (o := rnd.random() < .5) else 'Close'} the blinds in the {(x := rnd.choice(ROOMS))}.", "open_blinds", {"room": x, "open": o}),
        lambda r: (f"Vacuum the {(x := rnd.choice(ROOMS))}.", "start_vacuum", {"room": x}),
        lambda r: (f"Wake me at {(h := rnd.randint(5, 9))}:{(m := rnd.choice([0, 15, 30, 45])):02d}.", "set_alarm", {"hour": h, "minute": m}),
        lambda r: ("Cancel my alarm.", "cancel_alarm", {}),
        lambda r: (f"Water the garden for {(m := rnd.randint(5, 30))} minutes.", "water_garden", {"minutes": m}),
        lambda r: (f"Preheat the oven to {(c := rnd.randrange(150, 230, 10))} degrees.", "start_oven", {"celsius": c}),
        lambda r: (f"Run the dishwasher on {(p := rnd.choice(['eco', 'quick', 'intensive']))}.", "start_dishwasher", {"programme": p}),
        lambda r: (f"Wash the clothes at {(c := rnd.choice([30, 40, 60, 90]))} degrees.", "start_washing_machine", {"celsius": c}),
        lambda r: (f"{'Arm' if (a := rnd.random() < .5) else 'Disarm'} the alarm system.", "arm_security", {"armed": a}),
        lambda r: (f"Set the fan in the {(x := rnd.choice(ROOMS))} to {(s := rnd.randint(0, 3))}.", "set_fan", {"room": x, "speed": s}),
        lambda r: (f"Put {(i := rnd.choice(['milk', 'eggs', 'bread', 'apples', 'coffee', 'rice']))} on the shopping list.", "add_to_shopping_list", {"item": i}),
        lambda r: (f"Call {(p := rnd.choice(['mum', 'dad', 'grandma', 'grandpa', 'anna', 'tom']))}.", "call_person", {"person": p}),
        lambda r: (f"Feed the cat {(p := rnd.randint(1, 3))} portions.", "feed_pets", {"portions": p}),
        lambda r: (f"How much energy did we use in the last {(d := rnd.randint(2, 30))} days?", "report_energy", {"days": d}),
    ]
    out, seen = [], set()
    while len(out) < n:
        user, name, args = rnd.choice(makers)(None)
        if user in seen:
            continue
        seen.add(user)
        out.append({"user": user, "name": name, "arguments": args})
    return out


def ask(client, model, user, tool_choice):
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=80, metadata={"task": "home-eval"})
    latency = time.perf_counter() - t0
    msg = r.choices[0].message
    call = None
    if msg.tool_calls:
        c = msg.tool_calls[0]
        try:
            call = {"name": c.function.name, "arguments": json.loads(c.function.arguments)}
        except ValueError:
            call = None
    details = r.usage.prompt_tokens_details.model_dump() if r.usage.prompt_tokens_details else {}
    return {"call": call, "prompt_tokens": r.usage.prompt_tokens, "distilled_tokens": details.get("distilled_tokens", 0),
            "latency_s": latency}


def main():
    fw.ensure_venv(__file__)
    from openai import OpenAI

    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--held-out", type=int, default=60)
    ap.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()
    binary = REPO / "target" / "release" / "tunegate"
    if not binary.exists():
        sys.exit("build it first: cargo build --release --bin tunegate")
    data = examples(args.train + args.held_out, seed=7)
    train, held_out = data[:args.train], data[args.train:]
    work = Path(tempfile.mkdtemp(prefix="tunegate-tools-"))
    gw = suite.SuiteGateway(binary, work, args.model)
    gw.start()
    res = {"train": len(train), "held_out": len(held_out), "tools": len(TOOLS)}
    try:
        client = OpenAI(base_url=gw.base + "/v1", api_key="unused", max_retries=0, timeout=600)
        path = work / "home.jsonl"
        with open(path, "w") as f:
            for i, it in enumerate(train):
                call = [{"id": f"call_{i}", "type": "function",
                         "function": {"name": it["name"], "arguments": json.dumps(it["arguments"])}}]
                f.write(json.dumps({"tools": TOOLS, "messages": [
                    {"role": "system", "content": SYSTEM}, {"role": "user", "content": it["user"]},
                    {"role": "assistant", "content": None, "tool_calls": call}]}) + "\n")
        with open(path, "rb") as fh:
            up = client.files.create(file=(path.name, fh), purpose="fine-tune")
        t0 = time.time()
        job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=up.id, suffix="home")
        fw.log(f"job {job.id} on {len(train)} examples")
        while True:
            j = client.fine_tuning.jobs.retrieve(job.id)
            if j.status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(3)
        res["job_seconds"] = time.time() - t0
        events = [e["message"] for e in fw.job_events(gw, job.id)]
        res["job_events"] = [e for e in events if not e.startswith("step ")]
        if j.status != "succeeded":
            raise RuntimeError(f"job {j.status}: {j.error}\n" + "\n".join(events[-10:]))
        adapter = j.fine_tuned_model
        fw.log(f"{adapter} in {res['job_seconds']:.0f}s")
        variants = [("base + tools, required", "smollm2-135m-instruct", "required"),
                    ("adapter, required", adapter, "required"),
                    ("base + tools, auto", "smollm2-135m-instruct", "auto"),
                    ("adapter, auto", adapter, "auto")]
        rows = {name: [] for name, _, _ in variants}
        for name, model, choice in variants:
            ask(client, model, held_out[0]["user"], choice)  # warm-up
        for k, it in enumerate(held_out):
            for name, model, choice in variants:
                r = ask(client, model, it["user"], choice)
                r["exact"] = r["call"] == {"name": it["name"], "arguments": it["arguments"]}
                r["right_function"] = bool(r["call"]) and r["call"]["name"] == it["name"]
                rows[name].append(r)
            if (k + 1) % 20 == 0:
                fw.log(f"eval {k + 1}/{len(held_out)}")
        res["variants"] = {name: {
            "exact_match": statistics.mean(r["exact"] for r in rs),
            "right_function": statistics.mean(r["right_function"] for r in rs),
            "calls": statistics.mean(r["call"] is not None for r in rs),
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rs),
            "mean_distilled_tokens": statistics.mean(r["distilled_tokens"] for r in rs),
            "median_latency_ms": 1000 * statistics.median(r["latency_s"] for r in rs),
        } for name, rs in rows.items()}
    finally:
        gw.stop()
    out = REPO / "benches" / "results"
    (out / "tools.json").write_text(json.dumps(res, indent=2) + "\n")
    v = res["variants"]
    base_tokens = v["base + tools, required"]["mean_prompt_tokens"]
    lines = [
        "# Tool-list distillation (a smart-home assistant, 24 functions)",
        "",
        f"`python3 benches/flywheel/tools.py` (release build, default model and config, product defaults for training): "
        f"{res['train']} training examples from an OpenAI-format file (`tools` + assistant `tool_calls`), "
        f"{res['held_out']} held-out requests, greedy. The client sends the same request (system prompt, 24 tools, "
        f"`tool_choice`) to the base model and to the adapter; for the adapter the router drops the prompt and the tools. "
        f"Job: {res['job_seconds']:.0f} s.",
        "",
        "| variant | exact match | right function | answered with a call | prompt tokens | distilled | median latency |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in v.items():
        lines.append(f"| {name} | {s['exact_match']:.0%} | {s['right_function']:.0%} | {s['calls']:.0%} | "
                     f"{s['mean_prompt_tokens']:.0f} | {s['mean_distilled_tokens']:.0f} | {s['median_latency_ms']:.0f} ms |")
    ratio = base_tokens / max(v["adapter, required"]["mean_prompt_tokens"], 1)
    lines += ["", f"Prompt tokens: {ratio:.1f}x fewer with the adapter (target ≥ 10x with ≥ 1,500 tokens of tools).",
              "", "Job events:", ""] + [f"- {e}" for e in res["job_events"][:12]]
    (out / "tools.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
