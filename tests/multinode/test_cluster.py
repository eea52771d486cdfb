"""The multi-node test cluster itself: nodes, isolation, the ssh agent, mpirun and Slurm across
nodes, a node's death and a partition (fixtures ``cluster`` and ``slurm_cluster``)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.proctree import kill_tree
from tests.conftest import MPIRUN, ROOT, run_command
from tests.multinode.cluster import KEPT, Cluster, ClusterError, cleanup_leftovers, clusters
from tests.slurm.cluster import FINAL_STATES, SlurmCluster

pytestmark = pytest.mark.multinode

MPI_ROOT = ["--allow-run-as-root"] if os.geteuid() == 0 else []

CONNECT = """\
import errno, json, socket, sys
out = {}
for addr in sys.argv[2:]:
    with socket.socket() as s:
        s.settimeout(float(sys.argv[1]))
        try:
            s.connect((addr, 1))
            out[addr] = "connected"
        except TimeoutError:
            out[addr] = "timeout"
        except OSError as e:
            out[addr] = errno.errorcode[e.errno]
print(json.dumps(out))
"""
"""Connect to TCP port 1 (nothing listens there) of each address: ``ECONNREFUSED`` means the
address answered, ``ENETUNREACH`` that there is no route, ``timeout`` that nothing answered."""

SERVER = """\
import socket, sys, time
listener = socket.create_server(("", int(sys.argv[1])))
conn, _ = listener.accept()
time.sleep(300)
"""
"""Accept one connection on the port, then hold it open."""

CLIENT = """\
import pathlib, socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
pathlib.Path(sys.argv[3]).touch()
sock.settimeout(float(sys.argv[4]))
try:
    print("eof" if sock.recv(1) == b"" else "data")
except TimeoutError:
    print("timeout")
except ConnectionResetError:
    print("reset")
"""
"""Connect, say so with a file, then wait up to ARGV[4] seconds for what the peer sends:
``eof`` (it closed the connection), ``reset`` or ``timeout`` (nothing arrived)."""

RANK = """\
import json, os, socket
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(1)
print(json.dumps({"rank": comm.rank, "host": socket.gethostname(), "total": total,
                  "local": os.environ.get("MN_LOCAL"), "sent": os.environ.get("MN_SENT")}))
"""
"""One rank: an allreduce across the job, then where it ran and what it saw of the two
variables."""


def on(cluster: Cluster, node: str, cmd: list[str], timeout: float = 20, **kw) -> str:
    """Run ``cmd`` on ``node`` under a wall-clock limit; its stdout (a non-zero exit fails)."""
    res = run_command(cluster.command(node, cmd, **kw), timeout=timeout)
    assert res.returncode == 0, f"{node}: {cmd} exited {res.returncode}: {res.stderr}"
    return res.stdout


def connect(cluster: Cluster, node: str, *addresses: str, wait: float = 1.0) -> dict[str, str]:
    out = on(cluster, node, [sys.executable, "-c", CONNECT, str(wait), *addresses])
    return json.loads(out)


def ns_users(inode: int, kind: str) -> list[int]:
    """Processes (zombies excepted) in the namespace of ``kind`` with ``inode``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(f"/proc/{entry.name}/ns/{kind}").st_ino == inode:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def zombie(pid: int) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie its parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def commands(cluster: Cluster, node: str) -> list[str]:
    """The command lines of the node's processes."""
    found = []
    for pid in cluster.pids(node):
        with contextlib.suppress(OSError):
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return [c.strip() for c in found]


@pytest.mark.timeout(60)
def test_nodes_have_their_own_hostnames_and_resolve_each_other(cluster):
    assert [on(cluster, n, ["hostname"]).strip() for n in cluster.nodes] == ["n1", "n2", "n3"]
    hosts = on(cluster, "n1", ["getent", "hosts", "n3"]).split()
    assert hosts == [cluster.address("n3"), "n3"]


@pytest.mark.timeout(60)
def test_tmp_and_shm_are_node_local_and_the_shared_dir_is_shared(cluster):
    mark = f"mark-{secrets.token_hex(4)}"
    shared = cluster.shared / mark
    on(cluster, "n1", ["sh", "-c", f"echo n1 > /tmp/{mark}; echo n1 > /dev/shm/{mark}"])
    on(cluster, "n1", ["sh", "-c", f"echo from-n1 > {shared}"])
    assert on(cluster, "n1", ["cat", f"/tmp/{mark}", f"/dev/shm/{mark}"]) == "n1\nn1\n"
    for node in ("n2", "n3"):
        seen = on(cluster, node, ["sh", "-c", f"ls /tmp /dev/shm; cat {shared}"])
        assert mark not in seen and seen.endswith("from-n1\n")
    assert not Path(f"/tmp/{mark}").exists() and not Path(f"/dev/shm/{mark}").exists()
    assert shared.read_text() == "from-n1\n"
    devices = [on(cluster, n, ["stat", "-c", "%d", "/tmp", "/dev/shm"]) for n in cluster.nodes]
    devices += [f"{os.stat('/tmp').st_dev}\n{os.stat('/dev/shm').st_dev}\n"]
    assert len(set("".join(devices).split())) == 8  # a filesystem of its own for each
    assert on(cluster, "n2", ["test", "-x", str(MPIRUN)]) == ""  # the venv is on every node


@pytest.mark.timeout(60)
def test_no_route_out_of_a_node(cluster):
    outside = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    host_addresses = [w.split("/")[0] for i, w in enumerate(outside) if outside[i - 1] == "inet"]
    t0 = time.monotonic()
    seen = connect(cluster, "n2", *host_addresses, "192.0.2.1", cluster.address("n3"))
    assert seen == {**dict.fromkeys([*host_addresses, "192.0.2.1"], "ENETUNREACH"),
                    cluster.address("n3"): "ECONNREFUSED"}  # fmt: skip
    assert time.monotonic() - t0 < 10  # failed at once, no connect timeout
    routes = on(cluster, "n2", ["ip", "-o", "route"]) + on(cluster, "n2", ["ip", "-o", "-6", "r"])
    assert "default" not in routes
    bridge = subprocess.run(
        ["ip", "-o", "addr", "show", "dev", cluster.bridge], capture_output=True, text=True
    )
    assert bridge.returncode == 0 and bridge.stdout == ""  # no address on the bridge


@pytest.mark.timeout(60)
def test_agent_runs_a_command_on_a_node_like_ssh(cluster):
    env = {**os.environ, "MN_LOCAL": "caller"}
    out = run_command([str(cluster.agent), "n2", "hostname; pwd; env | sort"], env=env, timeout=20)
    host, cwd, *variables = out.stdout.splitlines()
    assert (out.returncode, host, cwd) == (0, "n2", os.path.expanduser("~"))
    assert sorted(v.split("=")[0] for v in variables) == [
        "HOME", "LOGNAME", "PATH", "PWD", "SHELL", "USER"
    ]  # fmt: skip
    assert run_command([str(cluster.agent), "n3", "exit", "7"], timeout=20).returncode == 7
    nowhere = run_command([str(cluster.agent), "n9", "true"], timeout=20)
    assert nowhere.returncode == 255 and "No route to host" in nowhere.stderr


@pytest.mark.timeout(120)
def test_mpirun_through_the_agent_runs_one_rank_per_node(cluster):
    cmd = [
        *(str(MPIRUN), *MPI_ROOT, "--with-ft", "ulfm", "--hostfile", str(cluster.hostfile())),
        *("--map-by", "node:oversubscribe", "-np", "3", "-x", "MN_SENT"),
        *(sys.executable, "-c", RANK),
    ]
    env = {**cluster.mpi_env, "MN_LOCAL": "here", "MN_SENT": "sent", "OMP_NUM_THREADS": "1"}
    res = run_command(cluster.command("n1", cmd, env=env, cwd=ROOT), timeout=100)
    assert res.returncode == 0, res.stdout + res.stderr
    ranks = sorted(
        (r["rank"], r["host"], r["total"], r["local"], r["sent"]) for r in res.json_lines()
    )
    assert ranks == [
        (0, "n1", 3, "here", "sent"),  # launched by mpirun on its own node: its environment
        (1, "n2", 3, None, "sent"),  # through the agent: only what -x passes
        (2, "n3", 3, None, "sent"),
    ]


@pytest.mark.timeout(90)
def test_a_killed_node_loses_its_processes_and_memory_and_revives_empty(cluster):
    on(cluster, "n2", ["sh", "-c", "echo state > /dev/shm/state; echo state > /tmp/state"])
    local = cluster.start_on("n2", ["sleep", "300"])
    remote = subprocess.Popen(  # started from n1 through the agent, as prted is
        cluster.command("n1", [str(cluster.agent), "n2", "sleep 301"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not any("sleep 301" in c for c in commands(cluster, "n2")):
            assert time.monotonic() < deadline, "the agent did not start sleep on n2"
            time.sleep(0.05)
        before = cluster.state["n2"]
        victims = cluster.pids("n2")
        assert {before.holder, local.pid} <= set(victims) and remote.pid in cluster.pids("n1")
        cluster.kill_node("n2")
        assert local.wait(timeout=10) == -9
        assert remote.wait(timeout=10) == 255  # the agent, on n1, lives on: "ssh" failed
        assert ns_users(before.net_ns, "net") == ns_users(before.mnt_ns, "mnt") == []
        assert not [p for p in victims if Path(f"/proc/{p}").exists() and not zombie(p)]
        assert not cluster.alive("n2") and cluster.netns("n2") not in os.listdir("/run/netns")
        assert not Path(f"/sys/class/net/{cluster.veth('n2')}").exists()
        with pytest.raises(ClusterError, match="down"):
            cluster.command("n2", ["true"])
        assert run_command([str(cluster.agent), "n2", "true"], timeout=20).returncode == 255
        assert (
            connect(cluster, "n1", cluster.address("n2"))[cluster.address("n2")] != "ECONNREFUSED"
        )
    finally:
        for proc in (local, remote):
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
    cluster.revive("n2")
    # empty but for the mount point of a checkout kept visible there (a clone under /tmp)
    kept = sorted({Path(k).relative_to("/tmp").parts[0] for k in KEPT if k.startswith("/tmp/")})
    assert on(cluster, "n2", ["sh", "-c", "hostname; ls -A /dev/shm /tmp"]) == "".join(
        f"{line}\n" for line in ["n2", "/dev/shm:", "", "/tmp:", *kept]
    )
    assert connect(cluster, "n1", cluster.address("n2")) == {cluster.address("n2"): "ECONNREFUSED"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("silent", "seen"), [(False, "eof"), (True, "timeout")])
def test_a_peer_sees_a_dying_node_close_its_connection_unless_the_death_is_silent(
    cluster, silent, seen
):
    port, connected = 5000, cluster.shared / f"connected-{secrets.token_hex(4)}"
    server = cluster.start_on("n3", [sys.executable, "-c", SERVER, str(port)])
    client = None
    try:
        deadline = time.monotonic() + 20
        while not cluster.listening("n3", port):
            assert time.monotonic() < deadline and server.poll() is None, "no listener on n3"
            time.sleep(0.05)
        args = [cluster.address("n3"), str(port), str(connected), "3"]
        client = cluster.start_on("n1", [sys.executable, "-c", CLIENT, *args])
        while not connected.exists():
            assert time.monotonic() < deadline and client.poll() is None, "client not connected"
            time.sleep(0.05)
        cluster.kill_node("n3", silent=silent)
        out, err = client.communicate(timeout=20)
        assert out.strip() == seen, err
    finally:
        for proc in (server, client):
            if proc is not None and proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()


@pytest.mark.timeout(60)
def test_a_cut_link_partitions_a_node_that_lives_on(cluster):
    n2 = cluster.address("n2")
    sleeper = cluster.start_on("n2", ["sleep", "300"])
    try:
        cluster.cut_link("n2")
        assert connect(cluster, "n1", n2)[n2] in ("timeout", "EHOSTUNREACH")
        assert (
            connect(cluster, "n2", cluster.address("n3"))[cluster.address("n3")] != "ECONNREFUSED"
        )
        assert cluster.alive("n2") and sleeper.poll() is None
        assert run_command([str(cluster.agent), "n2", "true"], timeout=20).returncode == 255
        cluster.restore_link("n2")
        deadline = time.monotonic() + 10
        while connect(cluster, "n1", n2)[n2] != "ECONNREFUSED":
            assert time.monotonic() < deadline, "n2 unreachable after its link was restored"
            time.sleep(0.1)
        assert sleeper.poll() is None
    finally:
        kill_tree(sleeper.pid)
        sleeper.wait()


@pytest.mark.timeout(60)
def test_cli_builds_kills_and_removes_a_cluster():
    root = Path("/var/tmp") / f"ftmpi-multinode-cli-{secrets.token_hex(4)}"
    cli = [sys.executable, "-m", "tests.multinode.cluster"]
    try:
        up = run_command([*cli, "up", "--nodes", "2", "--dir", str(root)], timeout=30)
        assert up.returncode == 0, up.stderr
        assert str(root / "hostfile") in up.stdout and "PRTE_MCA_plm_ssh_agent=" in up.stdout
        run = run_command([*cli, "run", "n2", "--dir", str(root), "--", "hostname"], timeout=20)
        assert (run.returncode, run.stdout) == (0, "n2\n")
        assert (
            run_command([*cli, "kill-node", "n2", "--dir", str(root)], timeout=20).returncode == 0
        )
        assert run_command([str(root / "nsrsh"), "n2", "true"], timeout=20).returncode == 255
        assert run_command([str(root / "nsrsh"), "n1", "hostname"], timeout=20).stdout == "n1\n"
    finally:
        down = run_command([*cli, "down", "--dir", str(root)], timeout=30)
        saved = json.loads((root / "cluster.json").read_text()) if root.exists() else {}
        shutil.rmtree(root, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert saved["prefix"] not in clusters()
    assert not [n for n in os.listdir("/sys/class/net") if n.startswith(saved["prefix"])]


@pytest.mark.timeout(60)
def test_a_cluster_whose_owner_died_is_removed_as_a_leftover():
    owner = subprocess.Popen(["true"])
    owner.wait()  # a dead pid: the owner crashed
    leftover = Cluster.create(1, owner=owner.pid)
    try:
        holder = leftover.state["n1"].holder
        assert not clusters()[leftover.prefix]["owner_alive"]
        cleanup_leftovers()  # (or another session's new cluster did it first)
        assert leftover.prefix not in clusters() and not leftover.root.exists()
        assert ns_users(leftover.state["n1"].net_ns, "net") == []
        assert zombie(holder)  # dead, not yet reaped by its parent (this process)
    finally:
        leftover.stop()


@pytest.mark.timeout(180)
def test_sbatch_runs_ranks_on_three_nodes_and_sacct_has_it(slurm_cluster: SlurmCluster):
    script = slurm_cluster.root / "ranks.sbatch"
    script.write_text(
        "#!/bin/bash\nexport OMP_NUM_THREADS=1\n"
        f"exec timeout 100 {MPIRUN} {' '.join(MPI_ROOT)} --with-ft ulfm"
        f" {sys.executable} -c '{RANK}'\n"
    )
    out = slurm_cluster.root / "job.out"
    job = slurm_cluster.sbatch(
        script,
        "-N",
        "3",
        "--ntasks-per-node=2",
        "--time=3",
        f"--output={out}",
        cwd=slurm_cluster.root,
    )
    fields = slurm_cluster.wait_job(
        job, lambda f: f["JobState"] in FINAL_STATES, 150, "the job to end"
    )
    text = out.read_text()
    assert fields["JobState"] == "COMPLETED", text
    ranks = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert sorted(r["host"] for r in ranks) == ["n1", "n1", "n2", "n2", "n3", "n3"], text
    assert {r["total"] for r in ranks} == {6}
    assert slurm_cluster.accounting(job) == ("COMPLETED", "0:0")
    nodes = slurm_cluster.client(
        ["sacct", "-j", str(job), "-X", "-n", "-P", "-o", "NNodes,NodeList"]
    )
    assert nodes.split() == ["3|n[1-3]"]
