"""The toy world: a procedural world of shapes, a small SD-shaped backbone pretrained on it, and a judge."""
