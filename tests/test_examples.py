"""The launch examples parse: accelerate reads the FSDP and DeepSpeed configs, bash the SLURM scripts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(("name", "kind"), [("fsdp.yaml", "FSDP"), ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(EXAMPLES / "accelerate" / name))
    assert config.distributed_type.name == kind and config.num_processes == 8 and config.mixed_precision == "bf16"


@pytest.mark.parametrize("script", ["slurm_train.sh", "slurm_sample_array.sh"])
def test_slurm_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(EXAMPLES / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
