"""Layer-level proxy for low-bit K/V recipes (issue 13): how far does each recipe move attention?

On the real model (SmolLM2-135M-Instruct, Paul Graham essays) this captures a context of L tokens
plus the T tokens that follow it (`capture_context`), then per layer quantizes the context's
clustered keys and values exactly as `squeeze` does (`split_positions`: the always-attended window
and dense tokens stay exact; `low_bit_fields` with the same token weights, outliers and, unless the
recipe says `blind`, the window queries' channel sensitivity), reads them back with the kernels'
float64 reference (`dequantize_context`), and measures the attention output of the
T held-out queries (their own rows, dense over the context, through the layer's o_proj):

    error = |o_proj(attn(K^, V^)) - o_proj(attn(K, V))| / |o_proj(attn(K, V))|   per layer

for keys and values quantized together, keys alone and values alone. Mean, RMS and max over
layers. It needs no lookup and no decoding, so a recipe costs ~1 min on the CPU where `sqz eval`
costs ~15; `sqz eval` remains what the accuracy claims come from (NOTES "v14").

    nice python benchmarks/kv_error_proxy.py --recipes 4:0.01 3:0.01 3:0.01:blind \
        --out benchmarks/results/v14/kv_error_proxy.json

A recipe is BITS:OUTLIER_FRACTION[:blind]. Writes --out (.json, .md, .png beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _recipe(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "blind"):
        raise argparse.ArgumentTypeError(f"recipe {text!r}: want BITS:OUTLIERS[:blind], e.g. 3:0.01")
    bits = int(parts[0])
    if bits not in (2, 3, 4):
        raise argparse.ArgumentTypeError(f"recipe {text!r}: bits must be 2, 3 or 4")
    return {"name": text, "bits": bits, "outliers": float(parts[1]), "sensitivity": len(parts) == 2}


class Setup:
    """Captured context + held-out queries of the real model, and everything a recipe reuses."""

    def __init__(self, context: int, held_out: int, window: int, dense_tokens: int, seed: int):
        from sqz_compile.assets import essay_tokens, load_smollm2
        from sqz_compile.squeeze.capture import capture_context, split_positions
        from sqz_compile.squeeze.quantize import rope_from_model, token_weights

        model, tok = load_smollm2()
        L, T, W = context, held_out, window
        cap = capture_context(model, essay_tokens(tok, L + T, seed=seed), window=W + T, chunk_size=512,
                              progress=False)
        # keys rotated at p - (L + T): what a squeeze of context_length L + T stores
        keys, values, queries, self.scaling = cap.keys[:, :, :L], cap.values[:, :, :L], cap.queries, cap.scaling
        layers, H, _, D = keys.shape
        self.layers, self.H, self.D, self.length = layers, H, D, L + T
        self.window_queries, self.held_out = queries[:, :, :W], queries[:, :, W:].double()
        self.rope = rope_from_model(model, L + T, D)
        self.clustered = split_positions(keys, self.window_queries, self.scaling, 0, dense_tokens)[1]
        self.keys, self.values = keys.double(), values.double()
        gather = lambda x: x.gather(2, self.clustered[..., None].expand(-1, -1, -1, D))  # noqa: E731
        self.clustered_keys, self.clustered_values = gather(keys), gather(values)
        self.weights = token_weights(keys, self.window_queries, self.scaling, self.clustered)
        self.o_proj = [model.model.layers[i].self_attn.o_proj.weight.detach().double() for i in range(layers)]
        self.reference = [self.attention(i, self.keys[i], self.values[i]) for i in range(layers)]

    def attention(self, i: int, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """o_proj of the held-out queries' attention over the context K, V [H, L, D] of layer i."""
        q = self.held_out[i]                                              # [Hq, T, D]
        g = q.shape[0] // self.H
        p = (torch.einsum("htd,hnd->htn", q, K.repeat_interleave(g, 0)) * self.scaling).softmax(-1)
        o = torch.einsum("htn,hnd->htd", p, V.repeat_interleave(g, 0))
        return o.permute(1, 0, 2).reshape(q.shape[1], -1) @ self.o_proj[i].T

    def quantized(self, recipe: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized post-RoPE keys and values [layers, H, L, D] of the recipe: squeeze's
        low_bit_fields, read back by the kernels' float64 reference (dequantize_context)."""
        from sqz_compile.config import SqueezeConfig
        from sqz_compile.squeeze.quantize import dequantize_context, low_bit_fields

        config = SqueezeConfig(kv_bits=recipe["bits"], kv_outliers=recipe["outliers"])
        f = low_bit_fields(self.clustered_keys, self.clustered_values, self.clustered, self.weights,
                           self.length, self.rope, config,
                           self.window_queries if recipe["sensitivity"] else None)
        k, v = dequantize_context(f["keys"], f["values"], self.clustered, f["rope"], f["codebooks"],
                                  f["key_norm"], f["value_norm"], f["outlier_idx"], f["outlier_val"], self.D)
        where = self.clustered[..., None].expand(-1, -1, -1, self.D)
        return self.keys.scatter(2, where, k), self.values.scatter(2, where, v)

    def errors(self, K: torch.Tensor, V: torch.Tensor) -> dict[str, list[float]]:
        out = {"both": [], "keys": [], "values": []}
        for i in range(self.layers):
            ref = self.reference[i]
            for part, (k, v) in (("both", (K[i], V[i])), ("keys", (K[i], self.values[i])),
                                 ("values", (self.keys[i], V[i]))):
                out[part].append(float((self.attention(i, k, v) - ref).norm() / ref.norm()))
        return out


def _summary(errs: list[float]) -> dict[str, float]:
    e = torch.tensor(errs)
    return {"mean": round(float(e.mean()), 4), "rms": round(float(e.square().mean().sqrt()), 4),
            "max": round(float(e.max()), 4), "worst_layer": int(e.argmax())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", type=_recipe, nargs="+",
                   default=[_recipe(r) for r in ("4:0.01", "4:0.01:blind", "3:0.01", "3:0.01:blind",
                                                 "3:0.03", "3:0.03:blind", "2:0.01", "2:0.01:blind")])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--held-out", type=int, default=256, help="tokens after the context whose queries are scored")
    p.add_argument("--window", type=int, default=100, help="observation window (SqueezeConfig default)")
    p.add_argument("--dense-tokens", type=int, default=16, help="SqueezeConfig default")
    p.add_argument("--seed", type=int, default=1, help="essay order (sqz eval's PPL text uses 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/kv_error_proxy.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    setup = Setup(a.context, a.held_out, a.window, a.dense_tokens, a.seed)
    print(f"captured {a.context} + {a.held_out} tokens in {time.perf_counter() - t0:.1f} s")
    rows = []
    header = f"| recipe | both: mean / rms / max (layer) | keys alone | values alone |"
    lines = [header, "|---|---|---|---|"]
    print(header)
    for r in a.recipes:
        t0 = time.perf_counter()
        e = setup.errors(*setup.quantized(r))
        row = {**r, **{part: _summary(v) for part, v in e.items()}, "per_layer": e,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        cell = lambda s: f"{s['mean']:.4f} / {s['rms']:.4f} / {s['max']:.4f} ({s['worst_layer']})"  # noqa: E731
        lines.append(f"| {r['name']} | {cell(row['both'])} | {cell(row['keys'])} | {cell(row['values'])} |")
        print(lines[-1], flush=True)
    stem = os.path.splitext(a.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    meta = {"context": a.context, "held_out": a.held_out, "window": a.window, "dense_tokens": a.dense_tokens,
            "seed": a.seed, "torch": torch.__version__}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# Low-bit K/V: held-out attention error per layer (SmolLM2, {a.context} + {a.held_out} "
                f"tokens)\n\n" + "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.5))
        for row in rows:
            ax.plot(row["per_layer"]["both"], label=row["name"])
        ax.set_xlabel("layer")
        ax.set_ylabel("relative error of o_proj(attention)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=100)
    except ImportError:
        pass
    print(f"wrote {a.out}, {stem}.md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
