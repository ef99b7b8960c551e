"""FX passes: find attention subgraphs, map them to layers, rewrite them to torch.ops.sqz.

    report = rewrite_attention(gm, ctx, model=model)   # in place on a GraphModule you own

match.py    one matcher per attention spelling (SDPA, eager matmul-softmax-matmul), repeat_kv undo,
            layer mapping through nn_module_stack
targets.py  op vocabulary shared by Dynamo (torch-level) and torch.export (aten) graphs
rewrite.py  the rewrite itself, context buffers, safety rules (strict: SqueezeDenseError; or one
            SqueezeDenseWarning per compiled model) and the RewriteReport
bound.py    context tensors that arrive as graph inputs (SqueezedModel) instead of buffers
"""
from .match import MATCHERS, AttentionMatch, find_attention, layer_of_path, undo_repeat_kv
from .rewrite import (ContextMismatchError, DenseNotice, RewriteReport, SqueezeDenseError, SqueezeDenseWarning,
                      rewrite_attention)

__all__ = ["rewrite_attention", "RewriteReport", "SqueezeDenseWarning", "SqueezeDenseError", "DenseNotice",
           "ContextMismatchError", "find_attention", "AttentionMatch", "MATCHERS", "layer_of_path",
           "undo_repeat_kv"]
