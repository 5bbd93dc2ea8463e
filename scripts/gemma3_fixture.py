#!/usr/bin/env python3
"""llama.cpp's reading of the Gemma 3 270M GGUF, for `tests/gemma3.rs`.

Runs llama.cpp's own tools (built by `scripts/bench-peer-llamacpp.sh` from the PyPI
source package, plus the `llama-tokenize`, `llama-completion` and `llama-quantize`
targets) on `models/gemma-3-270m-q4_k_m.gguf` (`tunegate model fetch --model
gemma3-270m`) and writes `tests/fixtures/gemma3/expected.json`:

- `tokenize`: texts and the token ids llama.cpp gives them (BOS first);
- `greedy_f32`: greedy continuations (32 tokens, as text) of raw prompts on the same
  weights dequantized to f32 (`llama-quantize --allow-requantize ... F32`), so that both
  engines do plain f32 arithmetic and must agree token for token — one prompt runs past
  the 512-position sliding window of the local layers;
- `greedy_q4km`: the same on the Q4_K_M file itself (llama.cpp's quantized arithmetic,
  which rounds activations differently from tunegate's; the test reports agreement);
- the SHA-256 of the model file and the llama.cpp source package used.

    cmake --build benches/.peers/build -j 2 --target llama-tokenize llama-completion llama-quantize
    python3 scripts/gemma3_fixture.py
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "benches", ".peers", "build", "bin")
MODEL = os.path.join(ROOT, "models", "gemma-3-270m-q4_k_m.gguf")
OUT = os.path.join(ROOT, "tests", "fixtures", "gemma3", "expected.json")
TOKENS = 32

TEXTS = [
    "The capital of France is",
    "Hello world! Naïve café, 1234567 emojis 🙂 and\ttabs\n\nnew lines.",
    "  leading spaces and <start_of_turn>user\nspecial tokens<end_of_turn>",
    "def fibonacci(n):\n    if n < 2:\n        return n",
]
LONG = " ".join(
    f"Item {i}: the {c} box holds {i * 7 % 13} stones."
    for i, c in zip(range(60), ["red", "blue", "green", "white", "black"] * 12)
) + " The last item is"
PROMPTS = ["The capital of France is", "def fibonacci(n):", LONG]


def run(args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def tokenize(text):
    out = run([os.path.join(BIN, "llama-tokenize"), "-m", MODEL, "-p", text, "--ids", "--log-disable"])
    return json.loads(out.strip().splitlines()[-1])


def complete(model, prompt):
    # llama-completion ends its output with two newlines of its own.
    out = run([
        os.path.join(BIN, "llama-completion"), "-m", model, "-p", prompt, "-n", str(TOKENS),
        "--temp", "0", "-t", "2", "-no-cnv", "--no-warmup", "--no-display-prompt", "-c", "2048",
    ])
    assert out.endswith("\n\n"), repr(out[-10:])
    return out[:-2]


def main():
    h = hashlib.sha256()
    with open(MODEL, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    with open(os.path.join(ROOT, "benches", ".peers", "source.txt")) as f:
        source = f.read().strip()
    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "gemma-f32.gguf")
        run([os.path.join(BIN, "llama-quantize"), "--allow-requantize", MODEL, f32, "F32", "2"])
        fixture = {
            "generator": "scripts/gemma3_fixture.py",
            "model_sha256": h.hexdigest(),
            "llama_cpp_source": source,
            "tokens": TOKENS,
            "tokenize": [{"text": t, "ids": tokenize(t)} for t in TEXTS],
            "greedy_f32": [{"prompt": p, "prompt_tokens": len(tokenize(p)), "text": complete(f32, p)} for p in PROMPTS],
            "greedy_q4km": [{"prompt": p, "text": complete(MODEL, p)} for p in PROMPTS],
        }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
