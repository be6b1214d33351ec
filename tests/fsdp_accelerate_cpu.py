"""scripts/pretrain.py through accelerate's own FSDP2 code on CPU processes (gloo), for tests/test_fsdp.py.

accelerate enables FSDP only for GPU-like process types: on CPU it builds the FSDP plugin from the launch
config and then runs as MULTI_CPU (unsharded), and our `make_accelerator` refuses that. This harness
lifts both, only here: the refusal is skipped and the accelerator state is switched to FSDP with the
plugin accelerate built, so `prepare` (fsdp2_prepare_model), `save_state` / `load_state`
(SHARDED_STATE_DICT) and `get_state_dict` run their FSDP2 code paths on CPU.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_accelerate_cpu.py scripts/pretrain.py PRETRAIN_ARGS...
"""

import sys

import accelerate.state
from accelerate.utils import DistributedType

from modeling_mae.training import runtime

from pretrain_helpers import import_pretrain


_original_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # every later AcceleratorState() re-reads the process state: switch both
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
runtime.refuse_fsdp_without_gpu = lambda cpu: None

if __name__ == "__main__":
    assert sys.argv[1].endswith("pretrain.py"), sys.argv[1]  # the script run_pretrain puts first
    sys.exit(import_pretrain().main(sys.argv[2:]))
