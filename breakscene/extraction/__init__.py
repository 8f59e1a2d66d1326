"""The Extractor and what its stages hand to each other; the step tensors; generation."""
