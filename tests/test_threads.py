"""The default thread count (plgk_cli/threads.py): the pure rule, the machine facts, and who decides
(--threads, OMP_NUM_THREADS, CUDA, Python callers) through the library calls and the CLI."""

from __future__ import annotations

import os
import pytest
import torch

from plgk_cli import threads
from plgk_cli.cli import set_threads
from plgk_cli.errors import AuditSpecError, ConfigError
from plgk_cli.threads import (PARAMETERS_PER_THREAD, Machine, apply_default, cgroup_cpu_limit,
                              choose_threads, request_default)
from test_cli_errors import CONFIG, invoke  # the same tiny run, through the same CliRunner

SMALL = 3_658  # the digits demo's CNN
BIG = 10_000_000


@pytest.fixture(autouse=True)
def torch_threads_restored(monkeypatch):
    """Each test starts without a pending default request and gives torch back its thread count."""
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    request_default(False)
    yield
    request_default(False)
    torch.set_num_threads(before)


def fake_machine(monkeypatch, cpus: int, load: float, host_cpus: int | None = None) -> None:
    monkeypatch.setattr(threads, "machine", lambda: Machine(cpus=cpus, host_cpus=host_cpus or cpus, load=load))


def test_busy_machine_small_model_gets_one_thread():
    assert choose_threads(cpus=2, load=1.9, parameters=SMALL) == 1
    assert choose_threads(cpus=2, load=4.0, parameters=SMALL) == 1


def test_small_model_gets_one_thread_even_on_an_idle_machine():
    assert choose_threads(cpus=16, load=0.0, parameters=SMALL) == 1
    assert choose_threads(cpus=16, load=0.0, parameters=2 * PARAMETERS_PER_THREAD - 1) == 1


def test_idle_machine_big_model_gets_several_threads():
    assert choose_threads(cpus=16, load=0.2, parameters=BIG) == 16
    assert choose_threads(cpus=2, load=0.1, parameters=BIG) == 2
    assert choose_threads(cpus=16, load=0.0, parameters=4 * PARAMETERS_PER_THREAD) == 4


def test_busy_machine_big_model_gets_the_free_cpus():
    assert choose_threads(cpus=2, load=1.9, parameters=BIG) == 1
    assert choose_threads(cpus=16, load=10.0, parameters=BIG) == 6
    assert choose_threads(cpus=16, load=40.0, parameters=BIG) == 1


def test_host_wide_load_counts_by_our_share_of_the_host():
    # a 2-CPU slice of a 64-CPU host at load 32: about one of our two CPUs is taken
    assert choose_threads(cpus=2, load=32.0, parameters=BIG, host_cpus=64) == 1
    assert choose_threads(cpus=2, load=8.0, parameters=BIG, host_cpus=64) == 2


@pytest.mark.parametrize("cpus", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("load", [-1.0, 0.0, 0.4, 0.6, 1.5, 7.0, 1000.0])
@pytest.mark.parametrize("parameters", [0, 1, SMALL, 10**5, 10**6, 10**12])
def test_never_more_than_the_cpus_never_less_than_one(cpus, load, parameters):
    assert 1 <= choose_threads(cpus, load, parameters) <= cpus
    assert 1 <= choose_threads(cpus, load, parameters, host_cpus=4 * cpus) <= cpus


def test_machine_facts_are_consistent():
    facts = threads.machine()
    assert 1 <= facts.cpus <= facts.host_cpus
    assert facts.load >= 0


@pytest.mark.parametrize("text, cpus", [("max 100000\n", None), ("200000 100000\n", 2),
                                        ("150000 100000\n", 2), ("50000 100000\n", 1), ("junk\n", None)])
def test_cgroup_quota(tmp_path, text, cpus):
    (tmp_path / "cpu.max").write_text(text)
    assert cgroup_cpu_limit(str(tmp_path / "cpu.max")) == cpus
    assert cgroup_cpu_limit(str(tmp_path / "missing")) is None


def test_default_sets_torch_threads_and_says_so(monkeypatch, capsys):
    fake_machine(monkeypatch, cpus=2, load=1.9)
    torch.set_num_threads(2)
    request_default()
    choice = apply_default(11_000, torch.device("cpu"), progress=True)
    assert choice.threads == 1 == torch.get_num_threads()
    assert capsys.readouterr().err == "threads: 1 (2 CPUs, load 1.9, 11k parameters; --threads N to override)\n"
    # once per command: the request is used up
    assert apply_default(11_000, torch.device("cpu"), progress=True) is None


def test_quiet_default_prints_nothing(monkeypatch, capsys):
    fake_machine(monkeypatch, cpus=16, load=0.0)
    request_default()
    assert apply_default(BIG, torch.device("cpu"), progress=False).threads == 16 == torch.get_num_threads()
    assert capsys.readouterr().err == ""


def test_explicit_threads_win(monkeypatch, capsys):
    fake_machine(monkeypatch, cpus=2, load=1.9)
    set_threads(2, ConfigError)
    assert apply_default(SMALL, torch.device("cpu"), progress=True) is None
    assert torch.get_num_threads() == 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", threads.THREAD_VARIABLES)
def test_thread_variables_win(monkeypatch, name):
    fake_machine(monkeypatch, cpus=2, load=1.9)
    monkeypatch.setenv(name, "2")
    torch.set_num_threads(2)
    set_threads(None, ConfigError)
    assert apply_default(SMALL, torch.device("cpu"), progress=True) is None
    assert torch.get_num_threads() == 2


def test_cuda_untouched(monkeypatch):
    fake_machine(monkeypatch, cpus=2, load=1.9)
    torch.set_num_threads(2)
    request_default()
    assert apply_default(SMALL, torch.device("cuda"), progress=True) is None
    assert torch.get_num_threads() == 2


def test_python_callers_keep_their_setting(monkeypatch):
    """Without the plgk command's request, train and replay leave torch.set_num_threads alone."""
    fake_machine(monkeypatch, cpus=2, load=1.9)
    torch.set_num_threads(2)
    assert apply_default(SMALL, torch.device("cpu"), progress=True) is None
    assert torch.get_num_threads() == 2


# --- through the CLI ---




@pytest.fixture
def config(tmp_path, tiny_npz):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG.format(npz=tiny_npz))
    return path


def test_train_and_replay_print_the_default(monkeypatch, config, tmp_path):
    fake_machine(monkeypatch, cpus=2, load=1.9)
    torch.set_num_threads(2)
    result = invoke("train", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "threads: 1 (2 CPUs, load 1.9, " in result.stderr
    assert torch.get_num_threads() == 1

    torch.set_num_threads(2)
    result = invoke("replay", "--ckpts", tmp_path / "run", "--audit-set", "test[:2]", "--out", tmp_path / "a.h5")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("threads: 1 (2 CPUs, load 1.9, ") == 1
    assert torch.get_num_threads() == 1

    result = invoke("replay", "--ckpts", tmp_path / "run", "--audit-set", "test[:2]", "--out", tmp_path / "b.h5",
                    "--threads", "2")
    assert result.exit_code == 0, result.stderr
    assert "threads:" not in result.stderr
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("command, error", [("train", ConfigError), ("replay", AuditSpecError)])
def test_threads_zero_refused_in_one_line(config, tmp_path, command, error):
    args = (("--config", config, "--out", tmp_path / "run") if command == "train" else
            ("--ckpts", tmp_path / "missing", "--audit-set", "test[:2]", "--out", tmp_path / "a.h5"))
    result = invoke(command, *args, "--quiet", "--threads", "0")
    assert result.exit_code == error.exit_code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"plgk: error: --threads: must be >= 1 and at most the {os.cpu_count()} CPUs of this machine, "
                     "got 0"], result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "a.h5").exists()
