"""`run --launcher` and the `slurm:` block: parsed once into typed config, bad values as one
line, and a launcher that cannot work here refused before anything is written."""

from __future__ import annotations

import sys

import pytest

from rsnc_bench.errors import ConfigError
from rsnc_bench.grid_config import GridConfig, SlurmConfig, load_grid

from .test_cli import assert_user_error, run


def test_a_yaml_grid_carries_the_launcher_and_its_slurm_block(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("""methods: [clip-ft]
launcher: slurm
slurm:
  partition: gpu
  time: 180
  gpus_per_cell: 1
  cpus_per_cell: 8
  mem_gb: 31.5
  array_parallelism: 16
  cells_per_task: 2
  setup: source /shared/venv/bin/activate, then nothing
  options: {account: proj42, qos: low, exclusive: true}
""")
    grid = load_grid(path)
    assert grid.launcher == "slurm"
    assert grid.slurm == SlurmConfig(partition="gpu", time=180, gpus_per_cell=1, cpus_per_cell=8, mem_gb=31.5, array_parallelism=16,
                                     cells_per_task=2, setup=("source /shared/venv/bin/activate, then nothing",),
                                     options=("account=proj42", "qos=low", "exclusive=True"))
    assert grid.slurm.sbatch_options() == {"account": "proj42", "qos": "low", "exclusive": True}
    # the command line overrides the file key by key, the rest of the block stays
    again = load_grid(path, {"launcher": "local", "slurm_time": "30", "slurm_setup": ["module load cuda"]})
    assert again.launcher == "local" and again.slurm.time == 30 and again.slurm.partition == "gpu"
    assert again.slurm.setup == ("module load cuda",)
    assert GridConfig().launcher == "inline" and GridConfig().slurm == SlurmConfig()


@pytest.mark.parametrize("yaml, message", [
    ("launcher: cloud", "launcher 'cloud' is not one of inline, debug, local, slurm"),
    ("slurm: 5", "slurm must be a mapping"),
    ("slurm: {tme: 30}", "unknown key slurm.tme; known keys: partition, time,"),
    ("slurm: {time: 0}", "slurm.time=0; use a whole number of at least 1"),
    ("slurm: {time: 2.5}", "slurm.time must be a whole number"),
    ("slurm: {time: soon}", "slurm.time must be a whole number"),
    ("slurm: {mem_gb: lots}", "slurm.mem_gb must be a number"),
    ("slurm: {mem_gb: 0}", "slurm.mem_gb=0.0; use a positive number of GB"),
    ("slurm: {gpus_per_cell: -1}", "slurm.gpus_per_cell=-1; use a whole number of at least 0"),
    ("slurm: {cells_per_task: 0}", "slurm.cells_per_task=0"),
    ("slurm: {options: {array: 3}}", "slurm option 'array' is set by rsnc-bench; leave it out"),
    ("slurm: {options: {time: '1:00:00'}}", "slurm option 'time' is set by rsnc-bench (use slurm.time)"),
    ("slurm: {options: [account]}", "slurm option 'account' is not of the form name=value"),
    ("launcher: slurm\ndevice: cuda", "--device cuda on Slurm needs a GPU per task"),
])
def test_bad_launcher_values_in_yaml_are_one_clear_error(tmp_path, yaml, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml + "\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_grid(path)


@pytest.mark.parametrize("args, fragments", [
    (["--launcher", "cloud"], ["launcher 'cloud' is not one of"]),
    (["--slurm-time", "abc"], ["command line: slurm.time must be a whole number"]),
    (["--slurm-mem-gb", "-2"], ["slurm.mem_gb=-2.0"]),
    (["--slurm-opt", "output=x.log"], ["slurm option 'output' is set by rsnc-bench"]),
])
def test_bad_launcher_options_fail_before_anything_runs(tmp_path, args, fragments):
    out = tmp_path / "runs"
    assert_user_error(run("run", "--out", out, *args), *fragments)
    assert not out.exists()


@pytest.mark.parametrize("launcher", ["debug", "local", "slurm"])
def test_without_submitit_a_launcher_is_one_line_naming_the_extra(tmp_path, monkeypatch, launcher):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    out = tmp_path / "runs"
    assert_user_error(run("run", "--out", out, "--launcher", launcher), f"--launcher {launcher} needs submitit",
                      'pip install "rsnc-bench[slurm]"')
    assert not out.exists()


def test_slurm_without_sbatch_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    out = tmp_path / "runs"
    assert_user_error(run("run", "--out", out, "--launcher", "slurm"), "--launcher slurm needs Slurm's sbatch and srun on PATH")
    assert not out.exists()
