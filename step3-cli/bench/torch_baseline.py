#!/usr/bin/env python3
"""Plain PyTorch eager versions of one Step3 MFA attention layer (decode) and one MoE layer,
written from the project's architecture spec, timed on the same shapes as `step3 bench`.

Usage: torch_baseline.py attention|moe --json '{"hidden": 7168, ...}'  -> one JSON line per case:
       {"bench": ..., "case": ..., "us": median microseconds}
       torch_baseline.py decode-model --json '{"config": {...}, "tensors": [[name, shape], ...],
       "prompt": 256, "tokens": 64, "dtype": "bf16"}'  -> {"case": "prefill"|"decode", "tok_s": ...}
Attention and MoE: weights are zeros except the MoE router (random), as in `step3 bench`; runs on
CUDA when present. decode-model: random weights, on the CPU.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def timer(device):
    def run(fn, iters):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
        times.sort()
        return times[len(times) // 2]
    return run


def rms_norm(x, g, eps=1e-5):
    v = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(v + eps)).to(x.dtype) * g


def rope(x, pos, theta=500000.0):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    f = pos.float()[..., None] * inv
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(cfg, dev, dtype, run):
    h, q, nh, d = cfg["hidden"], cfg["share_q"], cfg["heads"], 256
    w = {k: torch.zeros(s, device=dev, dtype=dtype) for k, s in
         dict(q_proj=(q, h), k_proj=(d, h), v_proj=(d, h), wq=(nh * d, q), o_proj=(h, nh * d)).items()}
    g = torch.ones(q, device=dev, dtype=dtype)
    for b in cfg["batches"]:
        for c in cfg["contexts"]:
            kc = torch.randn(b, c + 1, d, device=dev, dtype=dtype)
            vc = torch.randn(b, c + 1, d, device=dev, dtype=dtype)
            x = torch.randn(b, 1, h, device=dev, dtype=dtype)
            pos = torch.full((b, 1), c, device=dev)

            def step():
                ql = rms_norm(F.linear(x, w["q_proj"]), g)
                qh = rope(F.linear(ql, w["wq"]).view(b, 1, nh, d), pos[..., None])
                k = rope(F.linear(x, w["k_proj"]).view(b, 1, 1, d), pos[..., None])
                kc[:, c:c + 1] = k.view(b, 1, d)
                vc[:, c:c + 1] = F.linear(x, w["v_proj"])
                s = torch.matmul(qh.view(b, nh, d), kc.transpose(1, 2)) * d ** -0.5  # one K head for all
                p = torch.softmax(s.float(), -1).to(dtype)
                o = torch.matmul(p, vc).view(b, 1, nh * d)
                return F.linear(o, w["o_proj"])
            print(json.dumps({"bench": "attention", "case": f"b{b}_c{c}", "us": run(step, cfg["iters"])}), flush=True)


def moe(cfg, dev, dtype, run):
    h, i, e, k = cfg["hidden"], cfg["inter"], 48, 3
    gate = torch.randn(e, h, device=dev, dtype=dtype) / h ** 0.5
    wg = torch.zeros(e, i, h, device=dev, dtype=dtype)
    wu = torch.zeros(e, i, h, device=dev, dtype=dtype)
    wd = torch.zeros(e, h, i, device=dev, dtype=dtype)
    sg, su, sd = (torch.zeros(i, h, device=dev, dtype=dtype), torch.zeros(i, h, device=dev, dtype=dtype),
                  torch.zeros(h, i, device=dev, dtype=dtype))
    for t in cfg["tokens"]:
        x = torch.randn(t, h, device=dev, dtype=dtype)

        def step():
            probs = torch.softmax(F.linear(x, gate).float(), -1)
            wts, ids = torch.topk(probs, k, -1)
            out = torch.zeros_like(x)
            for ex in range(e):  # the reference's loop over experts
                tok, slot = torch.where(ids == ex)
                if tok.numel() == 0:
                    continue
                xe = x[tok]
                y = F.linear(F.silu(F.linear(xe, wg[ex])) * F.linear(xe, wu[ex]), wd[ex])
                out.index_add_(0, tok, y * wts[tok, slot, None].to(dtype))
            return out + F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd)
        print(json.dumps({"bench": "moe", "case": f"t{t}", "us": run(step, cfg["iters"])}), flush=True)


def decode_model(cfg, dev, dtype, run):
    """Prefill and greedy decode of a whole synthetic model with the fixtures' plain-PyTorch Step3
    (tests/fixtures/gen/step3_ref.py: the Hugging Face code's ops, KV cache concatenated per step)
    on random weights of the shapes given, as `step3 bench decode-model` runs its own."""
    import os
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "..", "tests", "fixtures", "gen"))
    from step3_ref import Step3Text
    torch.set_num_threads(os.cpu_count())  # step3_ref runs single-threaded for its goldens
    torch.manual_seed(0)
    weights = {}
    for name, shape in cfg["tensors"]:
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape)
        elif name.endswith("moe.gate.weight"):
            weights[name] = torch.randn(shape) / shape[-1] ** 0.5
        else:  # uniform with standard deviation 1/sqrt(fan-in), as the Rust side's
            weights[name] = (torch.rand(shape) * 2 - 1) * (3.0 / shape[-1]) ** 0.5
    model = Step3Text(None, dtype, cfg=cfg["config"], weights=weights)
    del weights
    vocab = cfg["config"]["vocab_size"]
    ids = torch.tensor([(i * 2654435761) % (1 << 32) % vocab for i in range(cfg["prompt"])])
    cache = {}
    t = time.perf_counter()
    logits, _ = model.forward(ids, cache, 0, last_only=True)
    nxt = int(logits[-1].argmax())
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for step in range(cfg["tokens"]):
        logits, _ = model.forward(torch.tensor([nxt]), cache, cfg["prompt"] + step)
        nxt = int(logits[-1].argmax())
    decode = time.perf_counter() - t
    for case, v in [("prefill", cfg["prompt"] / prefill), ("decode", cfg["tokens"] / decode)]:
        print(json.dumps({"bench": "decode-model", "case": case, "tok_s": v}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["attention", "moe", "decode-model"])
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    cfg = json.loads(a.json)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[cfg.get("dtype", "bf16")]
    with torch.inference_mode():
        {"attention": attention, "moe": moe, "decode-model": decode_model}[a.which](cfg, dev, dtype, timer(dev))
