"""Redraw the bundled example concept sets (src/conceptlab/examples/) from code."""

from pathlib import Path

from conceptlab.example_sets import write_example_sets

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1] / "src" / "conceptlab" / "examples"
    for path in write_example_sets(root):
        print(path)
