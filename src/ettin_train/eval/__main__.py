import sys

from ettin_train.eval.cli import main

sys.exit(main())
