"""Deprecated alias (kept for one release): the accuracy harness lives in `sqz_compile.eval`, its
attention function in `sqz_compile.attention_function`."""
from .attention_function import EVAL_IMPL, _eval_attention, squeezed_mode  # noqa: F401
from .eval.cli import build_parser, main, settings_from_args  # noqa: F401
from .eval.needles import NEEDLES, Needle, niah_prompt  # noqa: F401
from .eval.oracle import LayerStats, analyse_selection, per_key_offsets, record_stats, top_count_mask  # noqa: F401
from .eval.report import summarize, targets_check, write_markdown, write_plot, write_reports  # noqa: F401
from .eval.runs import (LOOKUPS, MODES, EvalSettings, Variant, answer_text, compare_logits, context_kv,  # noqa: F401
                   dense_cache, flat_view, greedy_answer, run, run_niah, run_ppl, user_logits,
                   variant_context, with_budget)
