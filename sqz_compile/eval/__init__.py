"""sqz_compile.eval: accuracy of Squeezed Attention on a real model: what the speed costs.

Measured against the dense model over the same prompt:
- needle in a haystack (NIAH): a distinctive fact inserted into essay text at a sentence boundary
  at some depth; the fixed context is the chat prefix plus the essay, the user's input is the
  chat-formatted question; greedy answers; a hit is an answer containing the fact's key word;
- perplexity (PPL) of continuing an essay: context = its first N tokens, user input = the next T,
  scored by teacher forcing (T - 1 predictions: the first user token is predicted by the context);
- next-token top-1 agreement and mean KL(dense || squeezed) over the same teacher-forced positions
  (PPL continuations, and the dense answer tokens of the NIAH questions);
- an oracle at the same sparsity: per (layer, KV head, query block) it keeps the same *number* of
  clustered context keys as the lookup, but the ones with the highest true attention probability
  (max over the block's queries and the GQA group's heads), so the lookup's loss is told apart
  from the loss of sparsity itself; per layer, the lookup's recall against that oracle.

How the squeezed model runs here: a transformers attention function ("sqz_eval", registered with
`AttentionInterface`) calls `torch.ops.sqz.squeezed_attention` with the layer's context tensors,
i.e. the same op the compiled model uses. The dense baseline runs the model's own SDPA attention
over a KV cache holding the full context (un-permuted from the SqueezedContext, keys rotated for
positions p - L, user tokens at 0, 1, ...: the same attention as the full prompt, because RoPE
depends only on relative positions; `run_ppl` checks it against a literal full-prompt forward).

Recall definitions (per layer; "clustered keys" = the context minus the always-kept window;
p = dense attention probability of a query row over all keys):
- mass_recall = sum(p over lookup-kept keys) / sum(p over oracle-kept keys), summed over rows;
- key_recall = |lookup keys & oracle keys| / |oracle keys|, summed over (head, block);
- kept_fraction = kept clustered keys / clustered keys (what the lookup actually kept);
- lost_mass_lookup / lost_mass_oracle = mean over rows of the p mass of dropped clustered keys.

Modules: needles.py (NIAH prompts), oracle.py (oracle selection, recall stats), runs.py (context
variants, dense baseline, PPL/NIAH experiments), report.py (summary, markdown, plot), cli.py
(`sqz eval` / benchmarks/accuracy.py). The attention function is `sqz_compile.attention_function`.
"""
