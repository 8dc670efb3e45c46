"""Generate with learned concepts: `python generate.py prompt="a photo of <my-cat>" concepts=[...]`."""

from conceptlab.cli import generate

if __name__ == "__main__":
    generate()
