"""Redraw the bundled example concept sets (src/conceptlab/examples/) from code: robot and ink, and the
toy world's concept sets."""

from pathlib import Path

from conceptlab.example_sets import write_example_sets
from conceptlab.toyworld.concepts import write_toy_concept_sets

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1] / "src" / "conceptlab" / "examples"
    for path in [*write_example_sets(root), *write_toy_concept_sets(root)]:
        print(path)
