#!/usr/bin/env python3
"""Reference logits from Hugging Face PEFT for tunegate's LoRA adapters.

Loads a Hugging Face Llama folder (`config.json` + `model.safetensors`) with
`transformers.LlamaForCausalLM` (torch, CPU, float32, eager attention), wraps it with
`peft.PeftModel.from_pretrained` once per adapter folder, and writes the logits of the
last position of one token sequence, for the base alone and for each adapter, as JSON.
Before running an adapter it checks that PEFT really took every tensor of the file
(same names, same values), so a silently skipped tensor cannot pass as a match.
With `--gguf FILE` it also loads a GGUF file through transformers' own GGUF reader
(needs the `gguf` package) and reports that base's logits as `base_gguf`, which checks
that tunegate's GGUF writer lays q/k rows out the way llama.cpp's converter does.

Used by `tests/peft_interop.rs`, live or through its committed fixture:

    # one-off venv outside the repo (PyPI only; torch pulls large wheels, ~minutes)
    python3 -m venv /tmp/peftvenv
    /tmp/peftvenv/bin/pip install torch transformers peft safetensors gguf

    # run the interop test against live PEFT instead of the fixture
    TUNEGATE_PEFT_VENV=/tmp/peftvenv cargo test --test peft_interop

    # regenerate tests/fixtures/peft/ (retrains the committed adapter, rewrites
    # expected.json by running this script with --out)
    TUNEGATE_PEFT_VENV=/tmp/peftvenv cargo test --test peft_interop -- --ignored regenerate_peft_fixture

By hand (the Rust test prints the exact command it ran):

    peft_check.py --base DIR --adapter NAME=DIR [--adapter NAME=DIR ...] \
        --tokens 1,2,3 [--gguf FILE] [--out expected.json]

Output (stdout, or `--out`): {"tokens", "inputs": {file: sha256}, "logits": {"base",
"<name>"..., "base_gguf"?}, "versions"}. Nothing is fetched from a model hub.
"""

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_FILES = ("config.json", "model.safetensors")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_base(path, gguf_file=None):
    kwargs = {"attn_implementation": "eager"}
    # transformers 5 renamed torch_dtype to dtype.
    major = int(transformers.__version__.split(".")[0])
    kwargs["dtype" if major >= 5 else "torch_dtype"] = torch.float32
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    model = transformers.LlamaForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()


def last_logits(model, tokens):
    with torch.no_grad():
        ids = torch.tensor([tokens], dtype=torch.long)
        out = model(input_ids=ids)
    return [float(x) for x in out.logits[0, -1].to(torch.float32)]


def check_loaded(model, adapter_dir):
    """Every tensor in the adapter file reached PEFT's modules, unchanged."""
    stored = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    live = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    missing = sorted(set(stored) - set(live))
    extra = sorted(set(live) - set(stored))
    if missing or extra:
        sys.exit(f"{adapter_dir}: PEFT did not map the adapter: not taken {missing[:4]}, not in file {extra[:4]}")
    for name, t in stored.items():
        if not torch.equal(live[name].to(torch.float32).cpu(), t.to(torch.float32)):
            sys.exit(f"{adapter_dir}: {name} changed on load")
    return len(stored)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="Hugging Face Llama folder (config.json + model.safetensors)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="PEFT adapter folder")
    p.add_argument("--tokens", required=True, help="comma-separated token ids")
    p.add_argument("--gguf", help="also load this GGUF base through transformers (needs `gguf`)")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    args = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    inputs = {f"base/{f}": sha256(os.path.join(args.base, f)) for f in BASE_FILES}
    logits = {"base": last_logits(load_base(args.base), tokens)}
    tensors = {}
    for spec in args.adapter:
        name, sep, adir = spec.partition("=")
        if not sep or name in logits or name == "base_gguf":
            sys.exit(f"--adapter {spec}: expected a new NAME=DIR")
        for f in ADAPTER_FILES:
            inputs[f"{name}/{f}"] = sha256(os.path.join(adir, f))
        # A fresh base per adapter: PeftModel injects its layers into the model it wraps.
        model = peft.PeftModel.from_pretrained(load_base(args.base), adir, is_trainable=False).eval()
        tensors[name] = check_loaded(model, adir)
        logits[name] = last_logits(model, tokens)
    if args.gguf:
        d, f = os.path.split(os.path.abspath(args.gguf))
        inputs["base_gguf"] = sha256(args.gguf)
        logits["base_gguf"] = last_logits(load_base(d, gguf_file=f), tokens)

    result = {
        "generator": "scripts/peft_check.py",
        "tokens": tokens,
        "inputs": inputs,
        "adapter_tensors": tensors,
        "logits": logits,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
