"""What `sqz eval` measures: its settings and the squeezed variants (no torch import, so that
`sqz eval --help` is fast)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_BLOCK_Q, SqueezeConfig

LOOKUPS = ("flat", "hier")
MODES = ("threshold", "budget", "bounded")


@dataclass(frozen=True)
class Variant:
    """One squeezed configuration: target keep, lookup ("flat"/"hier"), mode ("threshold"/"budget"/
    "bounded": error-bounded with max_dropped_mass = eps, where keep does not apply)."""

    keep: float
    lookup: str
    mode: str
    eps: float | None = None

    @property
    def name(self) -> str:
        if self.mode == "bounded":
            return f"eps={self.eps:g} {self.lookup} bounded"
        return f"keep={self.keep:g} {self.lookup} {self.mode}"


@dataclass
class EvalSettings:
    """What to measure (the CLI's flags)."""

    contexts: tuple[int, ...] = (2048, 4096)
    keeps: tuple[float, ...] = (0.25, 0.125)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needles: int = 3
    lookups: tuple[str, ...] = LOOKUPS
    modes: tuple[str, ...] = ("threshold", "budget")
    max_dropped_mass: float = 0.05   # eps of the "bounded" mode
    oracle: tuple[str, ...] = ("flat-threshold", "flat-budget")  # variants with an oracle run: LOOKUP-MODE, all
    ppl_tokens: int = 512
    ppl_contexts: tuple[int, ...] | None = None
    tasks: tuple[str, ...] = ("ppl", "niah")
    max_new_tokens: int = 12
    prime: bool = True               # start the assistant's answer with the needle's lead
    block_q: int = DEFAULT_BLOCK_Q
    cluster_ratio: float = 0.05
    observation_window: int = 100
    sink_tokens: int = SqueezeConfig.sink_tokens
    dense_tokens: int = SqueezeConfig.dense_tokens
    cluster_variance: bool = SqueezeConfig.cluster_variance
    dense_layers: int = SqueezeConfig.dense_layers
    kv_bits: int = SqueezeConfig.kv_bits
    kv_datatype: str = SqueezeConfig.kv_datatype
    kv_qnorm: bool = SqueezeConfig.kv_qnorm
    kv_outliers: float = SqueezeConfig.kv_outliers
    essay_seed: int = 0
    ppl_seed: int = 1
    ppl_segments: int = 1            # essay orders ppl_seed, ppl_seed + 1, ...: PPL pooled over them

    def variants(self) -> list[Variant]:
        return [Variant(k, lu, mo, self.max_dropped_mass if mo == "bounded" else None)
                for k in self.keeps for lu in self.lookups for mo in self.modes]

    def wants_oracle(self, v: Variant) -> bool:
        return "all" in self.oracle or f"{v.lookup}-{v.mode}" in self.oracle

    def squeeze_config(self) -> SqueezeConfig:
        return SqueezeConfig(keep=self.keeps[0], cluster_ratio=self.cluster_ratio,
                             hierarchical="hier" in self.lookups,
                             observation_window=self.observation_window, sink_tokens=self.sink_tokens,
                             dense_tokens=self.dense_tokens, cluster_variance=self.cluster_variance,
                             dense_layers=self.dense_layers, kv_bits=self.kv_bits,
                             kv_datatype=self.kv_datatype, kv_qnorm=self.kv_qnorm, kv_outliers=self.kv_outliers)
