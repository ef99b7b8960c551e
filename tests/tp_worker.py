"""One rank of tests/test_tp.py, started by torchrun: the tiny Llama in `folder`, tensor-parallel
through transformers (gloo on CPU), squeezed / loaded / compiled / generated with sqz_compile.
Writes what the test compares to `folder`/rank{r}.pt.

    torchrun --standalone --nproc_per_node 2 tests/tp_worker.py FOLDER
"""
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DistributedConfig

import sqz_compile
from sqz_compile import SqueezeConfig, SqueezedContext
from sqz_compile.context import SqueezedContextError


def main(folder: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(f"{folder}/model", dtype=torch.float32,
                                                 distributed_config=DistributedConfig(tp_plan="auto")).eval()
    model.generation_config.eos_token_id = None
    spec = torch.load(f"{folder}/spec.pt")
    out = {"rank": dist.get_rank()}

    def run(ctx: SqueezedContext, tag: str, generate: bool) -> None:
        """Greedy generate (tokens, logits of every step) or one forward (logits of every position)."""
        sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False, dynamic=True))
        if generate:
            gen = sm.generate(spec["query"], max_new_tokens=spec["new_tokens"], do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
            out[f"{tag}_tokens"], out[f"{tag}_logits"] = gen.sequences, torch.stack(gen.logits, 1)
        else:
            out[f"{tag}_logits"] = sm(spec["query"]).logits
        out[f"{tag}_rewritten"] = sm.report.layers

    # 1. one file squeezed in one process, each rank reading only its KV heads (every tensor
    #    checksummed whole, streamed): the same as its slice of the whole file
    single = SqueezedContext.load(f"{folder}/single.sqz", model)
    whole = SqueezedContext.load(f"{folder}/single.sqz").tensors()
    out["load_paths_agree"] = all(torch.equal(t, single.shard.take(n, whole[n])) for n, t in single.tensors().items())
    out["loaded_heads"] = single.num_kv_heads
    run(single, "single", generate=True)

    # 2. squeezed under TP (each rank its own heads), saved as one file, loaded back
    ctx = sqz_compile.squeeze(model, spec["context"], SqueezeConfig(**spec["tp_config"]), progress=False)
    out["squeezed_heads"] = ctx.num_kv_heads
    ctx.save(f"{folder}/tp.sqz")
    back = SqueezedContext.load(f"{folder}/tp.sqz", model)
    out["roundtrip"] = all(torch.equal(a, b) for a, b in zip(ctx.tensors().values(), back.tensors().values()))
    run(back, "tp", generate=False)

    # 3. a file made for a model with other KV heads is refused with a clear message
    try:
        SqueezedContext.load(f"{folder}/other.sqz", model)
        out["other_error"] = None
    except SqueezedContextError as e:
        out["other_error"] = str(e)
    torch.save(out, f"{folder}/rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
