#!/usr/bin/env python3
"""Training-throughput peer for `benches/training.rs`: Hugging Face PEFT LoRA on torch CPU.

Same work as the Rust bench: the SmolLM2-135M GGUF file (dequantized to float32 by
transformers' GGUF reader), synthetic sequences of random token ids with lengths 112..=144,
loss on the second half of each sequence, batches of 8 (padded to the longest), AdamW at
2e-4, one warm-up step, then STEPS timed optimizer steps. Reports real (unpadded) tokens
per second, as tunegate's trainer counts them. Settings: `all16` (rank 16, alpha 32, all
seven projections) and `qv8` (rank 8, alpha 16, q_proj and v_proj).

Run through `scripts/bench-peer-peft.sh`, which builds the venv; by hand:

    peft_peer.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --steps 4
"""

import argparse
import os
import random
import time


def peak_rss_mib():
    """Peak resident memory of this process so far (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--settings", default="all16,qv8")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    batch, mean_len, spread = 8, 128, 16

    rng = random.Random(7)
    sequences = []
    for _ in range(batch * (args.steps + 1)):
        n = rng.randint(mean_len - spread, mean_len + spread)
        sequences.append([rng.randint(2, 49151) for _ in range(n)])

    def make_batch(seqs):
        longest = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), longest), dtype=torch.long)
        labels = torch.full((len(seqs), longest), -100, dtype=torch.long)
        attn = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            labels[i, len(s) // 2 : len(s)] = torch.tensor(s[len(s) // 2 :])
        return ids, attn, labels, sum(len(s) for s in seqs)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    for setting in args.settings.split(","):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
        if setting == "all16":
            targets, rank, alpha = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16, 32
        elif setting == "qv8":
            targets, rank, alpha = ["q_proj", "v_proj"], 8, 16
        else:
            raise SystemExit(f"unknown setting {setting}")
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        times, tokens = [], 0
        for step in range(args.steps + 1):
            ids, attn, labels, n = make_batch(sequences[step * batch : (step + 1) * batch])
            t = time.time()
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step > 0:
                times.append(time.time() - t)
                tokens += n
        print(
            f"{setting}: {tokens / sum(times):.1f} tokens/s over {args.steps} steps "
            f"({tokens} tokens, {sum(times):.1f}s; per step {' '.join(f'{x:.2f}s' for x in times)}); "
            f"final loss {loss.item():.3f}; peak resident memory {peak_rss_mib():.0f} MiB"
        )


if __name__ == "__main__":
    main()
