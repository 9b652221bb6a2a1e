"""Host time a composition adds to each decoder step of ``model.generate()``.

Greedy decoding with cached key/values runs the decoder at T = batch (one new token per
sequence), where compute is negligible and host time is everything. This builds a tiny
encoder-decoder (mBART, T5 or Marian layout; d = 64, 6 + 6 layers, batch 1) and times, for each
variant, ``generate`` of K1 and of K2 new tokens (``min_new_tokens`` forces the length); the host
time of one decoder step is (t(K2) - t(K1)) / (K2 - K1), so the encoder pass and generate's
set-up cancel. Times are ``time.thread_time`` (this thread's CPU time: insensitive to other jobs'
scheduling), variants interleaved, best of ``--repeats``.

Variants: ``plain`` (no adapters), ``scalearn`` (``attach_scalearn``, N = 8 sources, r = 4, the
eval path with ω folded in), ``fusion`` (``attach_fusion``, same sources).

    PYTHONPATH=. python scripts/decode_overhead.py [--model mbart|t5|marian] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from scalearn_fast.models import attach_fusion, attach_scalearn, ffn_sites

D, LAYERS, N, R = 64, 6, 8, 4


def tiny_model(kind: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    bart = dict(
        d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=4 * D, decoder_ffn_dim=4 * D, vocab_size=128,
        max_position_embeddings=128,
    )  # fmt: skip
    if kind == "mbart":
        return tf.MBartForConditionalGeneration(tf.MBartConfig(**bart))
    if kind == "marian":
        return tf.MarianMTModel(tf.MarianConfig(**bart, decoder_vocab_size=128, pad_token_id=1))
    if kind == "t5":
        cfg = tf.T5Config(d_model=D, d_kv=32, d_ff=4 * D, num_layers=LAYERS, num_heads=2, vocab_size=128)
        return tf.T5ForConditionalGeneration(cfg)
    raise ValueError(f"model must be mbart, t5 or marian; got {kind!r}")


def random_sources(model: torch.nn.Module) -> dict[str, dict]:
    g = torch.Generator().manual_seed(1)
    shapes = ((R, D), (R,), (D, R), (D,))
    sites = ffn_sites(model)
    return {
        f"s{i}": {s.key: tuple(torch.randn(*sh, generator=g) * 0.1 for sh in shapes) for s in sites}
        for i in range(N)
    }


def build(kind: str, variant: str) -> torch.nn.Module:
    model = tiny_model(kind)
    if variant == "scalearn":
        attach_scalearn(model, random_sources(model), backend="auto")
    elif variant == "fusion":
        attach_fusion(model, random_sources(model), backend="auto")
    elif variant != "plain":
        raise ValueError(variant)
    return model.eval()


def generate_time(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
    start = time.thread_time()
    with torch.no_grad():
        model.generate(ids, decoder_start_token_id=2, **kw)
    return time.thread_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mbart", choices=("mbart", "t5", "marian"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--short", type=int, default=4, help="K1 new tokens")
    ap.add_argument("--long", type=int, default=36, help="K2 new tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    models = {v: build(args.model, v) for v in ("plain", "scalearn", "fusion")}
    for m in models.values():  # warm-up: caches, inference plans
        generate_time(m, ids, args.short)
    best = {v: [float("inf"), float("inf")] for v in models}
    for _ in range(args.repeats):
        for v, m in models.items():
            best[v][0] = min(best[v][0], generate_time(m, ids, args.short))
            best[v][1] = min(best[v][1], generate_time(m, ids, args.long))
    per_step = {v: (b[1] - b[0]) / (args.long - args.short) for v, b in best.items()}
    plain = per_step["plain"]
    layers = 2 * LAYERS  # encoder + decoder sites; a decode step runs the decoder's LAYERS
    import scalearn_fast

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"tree {os.path.dirname(os.path.dirname(scalearn_fast.__file__))}, load average {load}")
    print(f"model {args.model}, d={D}, {LAYERS}+{LAYERS} layers, batch 1, N={N} sources of r={R}")
    print("| variant | host ms per decode step | overhead vs plain | added per decoder layer |")
    print("|---|---|---|---|")
    for v, s in per_step.items():
        added = (s - plain) / (layers // 2) * 1e6
        print(f"| {v} | {s * 1e3:.3f} | {100 * (s / plain - 1):+.1f}% | {added:+.0f} µs |")


if __name__ == "__main__":
    main()
