"""Train an Ettin model from a YAML recipe.

    python train.py yamls/demo/encoder/pretrain.yaml                   # one process
    python train.py RECIPE.yaml train.max_duration=100ba data.num_workers=4  # with overrides
    composer -n 8 train.py RECIPE.yaml                                  # 8 processes on one node
    python train.py RECIPE.yaml --plan [--json]                         # what it will do, without training
"""

import sys

from ettin_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
