"""2 CPU ranks on gloo under torchrun: ddp and fsdp equal single-process training, sharded
checkpoints resume exactly and reshard 2 -> 1 and 1 -> 2, activation checkpointing changes
nothing, and SIGTERM makes every rank save and exit cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from nl.checkpoint import list_checkpoints

STEPS = 10


def overrides(token_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model.dim=32", "model.n_layers=2", "model.n_heads=2", f"data.dir={token_dir}",
            "data.seq_len=32", f"train.steps={STEPS}", "train.batch_size=8", "train.micro_batch_size=2",
            "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1", "eval.every=5",
            "eval.max_batches=2", "checkpoint.every=5", "checkpoint.keep_last=3",
            "dist.timeout_s=60", f"run.dir={run_dir}", *extra]


def train_argv(token_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """train.py's arguments for the test model of `overrides`."""
    return ["--config", "configs/tiny.yaml", *overrides(token_dir, run_dir, *extra)]


def command(nproc: int, token_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """`python train.py ...`, or launch/torchrun.sh for several processes (as README says)."""
    launcher = ["bash", "launch/torchrun.sh", str(nproc)] if nproc > 1 else [sys.executable, "train.py"]
    return launcher + train_argv(token_dir, run_dir, *extra)


def train_runs(nproc: int, token_dir: Path, root: Path, runs: dict[str, tuple[str, ...]],
               export: Collection[str] = ()) -> dict[str, Path]:
    """Each name: overrides of `runs` trained in root/name (resumed if it holds a checkpoint), all in
    ONE launch of `nproc` processes (tests/train_runs.py): a launch costs more than one of these
    runs. Every run is still train.py's main(argv). For each name in `export`, root/<name>-export then
    holds nl.export's model directory of that run's final checkpoint. Returns name -> run directory."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0"]
    spec = json.dumps([{"argv": train_argv(token_dir, root / name, *extra),
                        "export": str(root / f"{name}-export") if name in export else None} for name, extra in runs.items()])
    proc = subprocess.run([*launcher, "tests/train_runs.py", spec], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=550)  # under pytest's 600 s, to keep this message
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {name: root / name for name in runs}


def env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable, **extra}


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, n: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)[0]) >= n:
            return
        time.sleep(0.5)
    proc.kill()
    pytest.fail("training did not start in time")


def launch(nproc: int, token_dir: Path, run_dir: Path, *extra: str) -> tuple[list[float], list[float]]:
    proc = subprocess.run(command(nproc, token_dir, run_dir, *extra), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)


def crashed_after_step_5(src: Path, run: Path) -> Path:
    """A copy of a finished 10-step run as if it had crashed right after its step-5 checkpoint."""
    shutil.copytree(src, run)
    shutil.rmtree(dict(list_checkpoints(run))[10])
    (run / "metrics.jsonl").write_text("")
    return run


def metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def hope(cms_mode: str) -> tuple[str, ...]:
    """A 4-step HOPE run; cms_mode "both": in-context CMS levels and the outer schedule."""
    return ("model.arch=hope", "model.hope.chunk_size=8", "model.hope.memory_chunk_size=8", "train.steps=4",
            "eval.every=0", "checkpoint.every=0", f"model.hope.cms_mode={cms_mode}",
            "model.hope.cms_context_chunk_sizes=[1,4,16]")


HOPE_MODES = ["outer", "both"]


@pytest.fixture(scope="module")
def one_process_runs(token_dir, tmp_path_factory) -> dict[str, Path]:
    """"single" (the test model of `overrides`) and the HOPE runs "hope-outer", "hope-both"."""
    runs = {"single": (), **{f"hope-{mode}": hope(mode) for mode in HOPE_MODES}}
    return train_runs(1, token_dir, tmp_path_factory.mktemp("one_process"), runs)


@pytest.fixture(scope="module")
def two_rank_runs(token_dir, tmp_path_factory) -> dict[str, Path]:
    """On 2 ranks: "fsdp", "ddp" (also another micro-batch split), "hope-outer", "hope-both" (fsdp)."""
    runs = {"fsdp": ("dist.strategy=fsdp",), "ddp": ("dist.strategy=ddp", "train.micro_batch_size=4"),
            **{f"hope-{mode}": ("dist.strategy=fsdp", *hope(mode)) for mode in HOPE_MODES}}
    return train_runs(2, token_dir, tmp_path_factory.mktemp("two_ranks"), runs)


@pytest.fixture(scope="module")
def single_run(one_process_runs) -> Path:
    return one_process_runs["single"]


@pytest.fixture(scope="module")
def fsdp_run(two_rank_runs) -> Path:
    return two_rank_runs["fsdp"]


@pytest.fixture(scope="module")
def resumed_runs(token_dir, tmp_path_factory, single_run, fsdp_run) -> dict[str, Path]:
    """Runs crashed after step 5 and resumed (one launch per world size): "fsdp" at the same world
    size, "two_to_one" (the fsdp run in one process), "one_to_two" (the single run on 2 fsdp ranks)."""
    root = tmp_path_factory.mktemp("resumed")
    crashed_after_step_5(fsdp_run, root / "fsdp")
    crashed_after_step_5(fsdp_run, root / "two_to_one")
    crashed_after_step_5(single_run, root / "one_to_two")
    fsdp = ("dist.strategy=fsdp",)
    return {**train_runs(2, token_dir, root, {"fsdp": fsdp, "one_to_two": fsdp}),
            **train_runs(1, token_dir, root, {"two_to_one": ()})}


def test_ddp_and_fsdp_on_two_ranks_equal_single_process(single_run, fsdp_run, two_rank_runs):
    single, single_val = metrics(single_run)
    assert len(single) == STEPS
    fsdp, fsdp_val = metrics(fsdp_run)
    np.testing.assert_allclose(fsdp, single, rtol=1e-5)
    np.testing.assert_allclose(fsdp_val, single_val, rtol=1e-5)
    ddp, _ = metrics(two_rank_runs["ddp"])
    np.testing.assert_allclose(ddp, single, rtol=1e-5)  # also a different micro-batch split


def test_fsdp_resume_at_same_world_size_is_bit_exact(fsdp_run, resumed_runs):
    full, _ = metrics(fsdp_run)
    resumed, _ = metrics(resumed_runs["fsdp"])
    assert resumed == full[5:]


def test_fsdp_checkpoint_reshards_2_to_1_and_1_to_2(single_run, fsdp_run, resumed_runs):
    full_fsdp, _ = metrics(fsdp_run)
    resumed, _ = metrics(resumed_runs["two_to_one"])  # same data stream, now in one process
    np.testing.assert_allclose(resumed, full_fsdp[5:], rtol=1e-5)

    full_single, _ = metrics(single_run)
    resumed, _ = metrics(resumed_runs["one_to_two"])
    np.testing.assert_allclose(resumed, full_single[5:], rtol=1e-5)


def test_activation_checkpointing_keeps_the_loss_sequence(token_dir, tmp_path, single_run):
    from nl.config import load_config
    from nl.trainer import train

    reference, _ = metrics(single_run)
    for mode in ("full", "every_n"):
        run = tmp_path / mode
        train(load_config("configs/tiny.yaml", overrides(token_dir, run, f"dist.activation_checkpointing={mode}")))
        np.testing.assert_allclose(metrics(run)[0], reference, rtol=1e-6)


def test_sigterm_saves_on_every_rank_and_rerun_resumes(token_dir, tmp_path):
    run = tmp_path / "run"
    cmd = command(2, token_dir, run, "dist.strategy=fsdp", "train.steps=2000", "checkpoint.every=0",
                  "eval.every=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    wait_for_steps(proc, run, 3)
    os.killpg(proc.pid, signal.SIGTERM)  # as slurm or a scheduler would: the whole process group
    out, _ = proc.communicate(timeout=90)
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1, out[-3000:]
    stopped_at = ckpts[0][0]
    assert 3 <= stopped_at < 2000 and "stop signal received" in out
    (run / "metrics.jsonl").write_text("")
    subprocess.run(cmd[:-3] + [f"train.steps={stopped_at + 2}", "checkpoint.every=0", "eval.every=0"], cwd=REPO, env=env(), check=True, capture_output=True,
                   timeout=300)
    assert len(metrics(run)[0]) == 2  # resumed at the saved step and ran the remaining two


def _rank_pid(run: Path, rank: int) -> int | None:
    """The pid of the train.py process of LOCAL_RANK=rank training into run.dir=run."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"run.dir={run}".encode() in cmdline and f"LOCAL_RANK={rank}".encode() in environ \
                and any(arg.endswith(b"train.py") for arg in cmdline):
            return int(pid)
    return None


def test_a_failing_rank_ends_the_job_with_its_error(token_dir, tmp_path):
    """Rank 1 dies (SIGKILL, as the OOM killer would) mid-training: torchrun stops rank 0 at
    once instead of letting it wait on a collective, and exits non-zero naming rank 1."""
    run = tmp_path / "run"
    proc = subprocess.Popen(command(2, token_dir, run, "dist.strategy=fsdp", "train.steps=2000",
                                    "checkpoint.every=0", "eval.every=0"),
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for_steps(proc, run, 3)
    victim = _rank_pid(run, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    start = time.time()
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.time() - start < 30, "rank 0 was left waiting"
    assert "local_rank: 1" in out and "SIGKILL" in out, out[-3000:]
    assert _rank_pid(run, 0) is None  # no rank left behind
    assert not list_checkpoints(run)  # nothing half-written


def slurm_shims(tmp_path: Path) -> Path:
    """srun and scontrol stand-ins: srun logs its arguments (srun.log) and runs the command;
    scontrol answers `show hostnames` and `show job` (Command= the submitted script, as slurm
    records it) and logs anything else (scontrol.log)."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/srun.log\n'
                                'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (shims / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; '
        f'elif [[ "$1 $2" == "show job" ]]; then echo "   Command={REPO}/launch/slurm.sbatch --config x"; '
        f'else echo "$@" >> {tmp_path}/scontrol.log; fi\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    return shims


def submit(tmp_path: Path, args: list[str], **slurm_env: str) -> subprocess.Popen:
    """launch/slurm.sbatch as sbatch runs it: a spool copy of the script, started in another
    directory (the submit dir, not the repo)."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    shutil.copy(REPO / "launch" / "slurm.sbatch", spool / "slurm_script")
    elsewhere = tmp_path / "home"
    elsewhere.mkdir(exist_ok=True)
    variables = {"PATH": f"{slurm_shims(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
                 "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node001", "SLURM_SUBMIT_DIR": str(elsewhere),
                 **slurm_env}
    return subprocess.Popen(["bash", str(spool / "slurm_script"), *args], cwd=elsewhere, env=env(**variables),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_slurm_script_on_preemption_saves_and_requeues(token_dir, tmp_path):
    """launch/slurm.sbatch run as slurm would (a spool copy, submitted from another directory,
    srun/scontrol replaced by local shims), then sent the pre-emption signal USR1: every rank
    saves, and the job requeues itself."""
    run = tmp_path / "run"
    proc = submit(tmp_path, ["--config", "configs/tiny.yaml",
                             *overrides(token_dir, run, "dist.strategy=fsdp", "train.steps=2000",
                                        "checkpoint.every=0", "eval.every=0")],
                  NPROC_PER_NODE="2", SLURM_CPUS_PER_TASK="2", SLURM_NTASKS_PER_NODE="1")
    wait_for_steps(proc, run, 3)
    os.kill(proc.pid, signal.SIGUSR1)  # --signal=B:USR1@300 targets the batch script only
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert len(list_checkpoints(run)) == 1 and "stop signal received" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "--cpus-per-task=2" in (tmp_path / "srun.log").read_text().split()


def fake_python(tmp_path: Path) -> Path:
    """A PYTHON that records where and how the script started torchrun, instead of training."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\n{{ echo "cwd=$(pwd)"; echo "omp=$OMP_NUM_THREADS"; '
                    f'echo "setup=${{NL_TEST_SETUP:-}}"; echo "args=$*"; }} > {tmp_path}/python.log\n')
    fake.chmod(0o755)
    return fake


def started(tmp_path: Path, proc: subprocess.Popen) -> dict[str, str]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    log = dict(line.split("=", 1) for line in (tmp_path / "python.log").read_text().splitlines())
    srun = (tmp_path / "srun.log").read_text().split()
    log["srun"] = " ".join(a for a in srun if a.startswith("--"))
    return log


@pytest.mark.parametrize("slurm_env, nproc, cpus, threads", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "SLURM_NTASKS_PER_NODE": "1"}, 4, 32, 8),
    ({"SLURM_GPUS_PER_NODE": "h100:8", "SLURM_CPUS_PER_TASK": "64"}, 8, 64, 8),
    ({"SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "2"}, 4, 8, 2),  # CPU job: a rank per task
    ({"SLURM_CPUS_ON_NODE": "6"}, 1, 6, 6),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "3"}, 2, 32, 3),
])
def test_slurm_script_derives_ranks_and_cpus_from_slurm(tmp_path, slurm_env, nproc, cpus, threads):
    """From a spool copy in another directory: torchrun runs in the repo root with one rank per
    GPU (or per task), and srun gets --cpus-per-task (Slurm >= 22.05 does not pass it on)."""
    env_vars = {"PYTHON": str(fake_python(tmp_path)), **slurm_env}
    if "OMP_NUM_THREADS" not in slurm_env:
        env_vars["OMP_NUM_THREADS"] = ""  # unset for the script: it derives it
    log = started(tmp_path, submit(tmp_path, ["--config", "configs/tiny.yaml", "train.steps=1"], **env_vars))
    assert log["cwd"] == str(REPO)
    assert f"--nproc_per_node={nproc} " in log["args"] and log["args"].endswith("train.py --config "
                                                                                "configs/tiny.yaml train.steps=1")
    assert f"--cpus-per-task={cpus}" in log["srun"] and "--ntasks-per-node=1" in log["srun"]
    assert log["omp"] == str(threads)


def test_slurm_script_finds_the_repo_from_nl_root_or_submit_dir_and_sources_nl_setup(tmp_path):
    setup = tmp_path / "setup.sh"
    setup.write_text("export NL_TEST_SETUP=sourced\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")  # no Command= known
    (tmp_path / "bin" / "srun").write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path}/srun.log\n'
                                           'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for shim in (tmp_path / "bin").iterdir():
        shim.chmod(0o755)
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(REPO / "launch" / "slurm.sbatch", spool / "slurm_script")
    base = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1",
            "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "4", "PYTHON": str(fake_python(tmp_path))}

    def run_from(cwd: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(spool / "slurm_script"), "train.steps=1"], cwd=cwd,
                              env=env(**base, **extra), capture_output=True, text=True, timeout=60)

    for extra in ({"NL_ROOT": str(REPO), "SLURM_SUBMIT_DIR": str(tmp_path)},
                  {"SLURM_SUBMIT_DIR": str(REPO), "NL_SETUP": str(setup)}):
        proc = run_from(tmp_path, **extra)
        assert proc.returncode == 0, proc.stderr
        log = dict(line.split("=", 1) for line in (tmp_path / "python.log").read_text().splitlines())
        assert log["cwd"] == str(REPO) and log["setup"] == ("sourced" if "NL_SETUP" in extra else "")
    lost = run_from(tmp_path, SLURM_SUBMIT_DIR=str(tmp_path))
    assert lost.returncode != 0 and "NL_ROOT=/path/to/nl" in lost.stderr
    wrong = run_from(tmp_path, NL_ROOT=str(tmp_path))
    assert wrong.returncode != 0 and f"NL_ROOT={tmp_path} holds no train.py" in wrong.stderr


@pytest.mark.parametrize("cms_mode", HOPE_MODES)  # both: in-context CMS levels and the outer schedule
def test_hope_fsdp_on_two_ranks_equals_single_process(one_process_runs, two_rank_runs, cms_mode):
    single, _ = metrics(one_process_runs[f"hope-{cms_mode}"])
    fsdp, _ = metrics(two_rank_runs[f"hope-{cms_mode}"])
    np.testing.assert_allclose(fsdp, single, rtol=1e-5)


def test_torchrun_sh_refuses_a_process_count_that_is_not_one_in_one_line():
    """A forgotten or bad NPROC (torchrun itself answers with a ValueError / AssertionError traceback)."""
    for argv in (["--config", "configs/tiny.yaml"], ["0", "--config", "configs/tiny.yaml"], ["two"]):
        proc = subprocess.run(["bash", "launch/torchrun.sh", *argv], capture_output=True, text=True, timeout=30,
                              cwd=REPO, env={**os.environ, "PYTHON": "false"})  # the check runs before python
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"NPROC must be a process count (or auto, gpu, cpu), got '{argv[0]}'" in proc.stderr
