"""Save the embedded tiny backbone as a diffusers folder (to inspect it, or to try `model.path=`).

python scripts/make_tiny_backbone.py /tmp/tiny-sd && python train.py model.path=/tmp/tiny-sd
"""

import argparse

from conceptlab.backbone import save_tiny_backbone

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_tiny_backbone(args.folder, seed=args.seed))
