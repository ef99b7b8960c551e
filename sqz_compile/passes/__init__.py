"""FX passes: find attention subgraphs, map them to layers, rewrite them to torch.ops.sqz."""
