"""Storage and outputs: fsspec paths with atomic commits, output checks, the bundle, its model card, strict JSON."""
