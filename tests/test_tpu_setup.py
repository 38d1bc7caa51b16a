"""tpu_setup scripts: valid bash, and their --dry-run prints the gcloud commands we mean."""

import os
import shlex
import subprocess

import pytest

from tests.helpers import REPO

SETUP = os.path.join(REPO, "tpu_setup")
SCOPE = ["--name=pod1", "--zone=us-east5-a", "--dry-run"]


def _dry(script, *args):
  proc = subprocess.run(["bash", os.path.join(SETUP, script), *SCOPE, *args],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(SETUP) if f.endswith(".sh")))
def test_scripts_parse(script):
  assert subprocess.run(["bash", "-n", os.path.join(SETUP, script)]).returncode == 0


def test_create_tpu_vm_and_queued_resource():
  [vm] = _dry("create.sh", "--accelerator-type=v6e-256")
  assert vm[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and vm[5] == "pod1"
  assert {"--zone=us-east5-a", "--accelerator-type=v6e-256",
          "--version=v2-alpha-tpuv6e"} <= set(vm)
  [queued] = _dry("create.sh", "--accelerator-type=v5p-64", "--queued", "--spot")
  assert queued[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--node-id=pod1", "--runtime-version=v2-alpha-tpuv5", "--spot"} <= set(queued)


def test_install_and_launch_run_on_every_worker():
  tar, scp, ssh = _dry("install.sh")
  assert tar[0] == "tar" and "--exclude=.git" in tar
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert "--worker=all" in ssh and "pip install -e ~/jaxllm'[tpu]'" in ssh[-1]
  [launch] = _dry("launch.sh", "--config=experiments/llama3_8b.py:v5p-64",
                  "--workdir=/mnt/shared/l3", "--config.train.steps=10")
  assert launch[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in launch
  remote = launch[-1].removeprefix("--command=")
  assert shlex.split(remote)[:8] == [
      "cd", "~/jaxllm", "&&", "nohup", "python3", "-m", "jaxllm.train",
      "--config=experiments/llama3_8b.py:v5p-64"]
  assert "--workdir=/mnt/shared/l3 --config.train.steps=10 > ~/jaxllm-train.log" in remote
  [supervised] = _dry("launch.sh", "--config=experiments/llama3_8b.py:v5p-64",
                      "--workdir=/mnt/shared/l3", "--restarts=5")
  assert shlex.split(supervised[-1].removeprefix("--command="))[3:10] == [
      "nohup", "bash", "tpu_setup/supervise.sh", "5", "python3", "-m", "jaxllm.train"]


# Fails (exit 1) on its first two runs, then succeeds; counts its runs in a file.
_FLAKY = 'n=$(($(cat "$0" 2>/dev/null || echo 0) + 1)); echo $n > "$0"; [ $n -ge 3 ] || exit 1'


@pytest.mark.parametrize("restarts, code, runs, rc", [
    (5, _FLAKY, 3, 0),  # restarted until it succeeds
    (1, _FLAKY, 2, 1),  # out of restarts: the last status
    (5, 'echo 1 > "$0"; exit 2', 1, 2),  # a config error is not restarted
])
def test_supervise_restarts_a_failed_run(tmp_path, restarts, code, runs, rc):
  counter = tmp_path / "runs"
  proc = subprocess.run(["bash", os.path.join(SETUP, "supervise.sh"), str(restarts), "bash",
                         "-c", code, str(counter)], capture_output=True, text=True, timeout=60,
                        env={**os.environ, "SUPERVISE_DELAY": "0"})
  assert proc.returncode == rc and int(counter.read_text()) == runs, proc.stderr
  assert proc.stderr.count("supervise: exit status 1; restart") == runs - 1


def test_logs_and_delete():
  mkdir, *copies = _dry("logs.sh", "--out=logs")
  assert mkdir == ["mkdir", "-p", "logs"]
  assert [c[-1] for c in copies] == ["--worker=0", "--worker=1"]
  [tail] = _dry("logs.sh", "--tail=20")
  assert "--worker=all" in tail and "tail -n 20 ~/jaxllm-train.log" in tail[-1]
  [delete] = _dry("delete.sh", "--queued")
  assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]


@pytest.mark.parametrize("script, args, message", [
    ("create.sh", ["--zone=z"], "--name=NAME is required"),
    ("create.sh", ["--name=a", "--zone=z"], "--accelerator-type"),
    ("launch.sh", ["--name=a", "--zone=z", "--workdir=/x"], "--config=EXPERIMENT"),
    ("launch.sh", ["--name=a", "--zone=z", "--config=c", "--workdir=/x", "--restarts=many"],
     "--restarts=many is not a count"),
    ("delete.sh", ["--name=a", "--zone=z", "--bogus"], "unknown flag --bogus"),
])
def test_missing_or_unknown_flags_fail_in_one_line(script, args, message):
  proc = subprocess.run(["bash", os.path.join(SETUP, script), *args], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_supervise_passes_sigterm_on_and_does_not_restart(tmp_path):
  import signal
  import time
  log = tmp_path / "log"
  child = ('sleep 30 & s=$!; trap "kill $s; echo stopped >> $0; exit 143" TERM; '
           'echo started >> "$0"; wait')
  proc = subprocess.Popen(["bash", os.path.join(SETUP, "supervise.sh"), "5", "bash", "-c", child,
                           str(log)], stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "SUPERVISE_DELAY": "0"})
  began = time.monotonic()
  while not (log.exists() and "started" in log.read_text()) and time.monotonic() - began < 30:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 143 and log.read_text().split() == ["started", "stopped"], err
