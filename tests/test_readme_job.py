"""README.md's "A job by hand" block, run as written on both brokers (issue #10).

The block is read from README.md (never copied here) and run by ``bash`` as one real subprocess in a temporary
directory, as a user would paste it: only the port (a free one) and, for Mosquitto, the broker line change. The
machine is a fresh one with a network: no ``$FEDMQTT_DATA``, an empty cache, and MNIST downloaded from a
loopback mirror of the original files (the ``data_mirror`` fixture). ``fedmqtt`` and ``python`` are this
virtual environment's.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DataMirror, require_mosquitto
from fedmqtt.broker.net import find_free_port

README = Path(__file__).resolve().parents[1] / "README.md"
README_PORT = "1883"
EMBEDDED_LINE = "fedmqtt broker --embedded --port"
LIMIT_S = 120.0
ROUNDS = 3


def readme_block() -> str:
    """The shell block of README.md's section "## A job by hand"."""
    text = README.read_text()
    start = text.index("\n## A job by hand\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"expected one ```sh block in README.md's 'A job by hand', found {len(blocks)}"
    return blocks[0]


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run_block(script: str, cwd: Path) -> tuple[int, str, float]:
    """Run ``script`` with bash in its own process group; kill the group if it overruns. Returns the exit code,
    the output and the seconds taken; fails the test if any process of the group outlives it."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", COLUMNS="200")
    log_path = cwd / "block.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["bash", "-c", script], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            elapsed = time.monotonic() - started
            leftovers = group_alive(process.pid)
            if leftovers or code is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    output = log_path.read_text(errors="replace")
    assert code is not None, f"the README block did not finish within {LIMIT_S} s:\n{output[-6000:]}"
    assert not leftovers, f"processes of the README block outlived it:\n{output[-6000:]}"
    return code, output, elapsed


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "broker", [pytest.param("mosquitto", marks=pytest.mark.mosquitto), "embedded"], ids=["mosquitto", "embedded"]
)
@pytest.mark.e2e
def test_readme_job_by_hand_runs_as_written(broker: str, tmp_path: Path, data_mirror: DataMirror) -> None:
    block = readme_block()
    assert README_PORT in block and block.count(EMBEDDED_LINE) == 1, block
    port = find_free_port()
    script = block.replace(README_PORT, str(port))
    if broker == "mosquitto":
        require_mosquitto()
        config_dir = tmp_path / "mosquitto"
        script = script.replace("fedmqtt broker --embedded", f"fedmqtt broker --mosquitto --config-dir {config_dir}")
    workdir = tmp_path / "work"
    workdir.mkdir()

    code, output, elapsed = run_block(script, workdir)
    print(f"README block on {broker}: {elapsed:.1f} s")

    assert code == 0, output[-6000:]
    assert "coordinator exit 0" in output, output[-6000:]
    # The fresh machine: the first line downloaded MNIST into the (empty) cache once; the devices found it there.
    assert (tmp_path / "cache" / "fedmqtt" / "mnist").is_dir(), output[-6000:]
    assert sorted(data_mirror.file_requests()) == [
        "/mnist/t10k-images-idx3-ubyte.gz",
        "/mnist/t10k-labels-idx1-ubyte.gz",
        "/mnist/train-images-idx3-ubyte.gz",
        "/mnist/train-labels-idx1-ubyte.gz",
    ]
    # `fedmqtt watch --once` printed the finished job and the retained summary of every round.
    assert re.search(r"job mnist \| run \w+ \| phase finished \| rounds done 3/3", output), output[-6000:]
    closed = {int(m.group(1)) for m in re.finditer(r"^\W*(\d+)\s+(?:quorum|deadline)\s+\d+\s", output, re.M)}
    assert closed == set(range(1, ROUNDS + 1)), output[-6000:]
    assert any((workdir / "ckpt").iterdir()), "the coordinator wrote no checkpoint"
    assert not port_is_open(port), "the broker still listens after the block ended"
    assert elapsed < LIMIT_S
