"""Run by tests/train/test_shims.py as one process of each of two "nodes" (NODE_RANK 0 and 1, one process each,
the environment the Composer launcher gives them): prints Composer's node signal file name, without and then with
shims.per_node_signal_files(), one per line."""

from composer.devices import DeviceCPU
from composer.utils import dist

from ettin_train.train import shims

dist.initialize_dist(DeviceCPU())
print(dist.get_node_signal_file_name())
shims.per_node_signal_files()
print(dist.get_node_signal_file_name())
