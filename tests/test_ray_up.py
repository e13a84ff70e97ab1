"""`ray up` for real: this machine as the one node of an on-premise cluster, reached over SSH.

An sshd of the test's own (its own config, host key and user key, on 127.0.0.1 and a free port)
lets a dedicated, unprivileged user log in; `ray up -y` runs Ray's local provider with the
project's own ``cluster-local.yaml``, so every setup and start command of that file runs on the
"node" exactly as Ray sends it. Then the quickstart sweep goes to the head with
``ray job submit --working-dir .`` (the sweep itself joins with ``--address auto``), its Parquet
rows are read back, ``ray down -y`` tears the cluster down, and no process of the test may remain.

Only site-specific values of the file are substituted; each one is in ``SUBSTITUTIONS`` with why.
Everything the launcher and the node write stays in one temporary folder: the launcher runs with
its own HOME (the cluster's token, Ray's config cache), Ray's temp folders are the test's own (not
the machine's /tmp/ray, whose ``ray_current_cluster`` other Ray instances read), and the node is
a user created for this test (its own HOME: never root's ~/.bashrc or ~/.ray). Its ``ray stop``
runs as that user, so it cannot stop another user's Ray (other test runs on a shared machine).

Needs root (to create the user and run sshd) and Debian's openssh-server, rsync and
netcat-openbsd; `.ci/run` installs them. Elsewhere the test skips with one line, in CI
(HARDMIX_CI=1) it fails.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SSHD = "/usr/sbin/sshd"
#: Debian package of each tool the test needs.
TOOLS = {SSHD: "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
         "rsync": "rsync", "nc": "netcat-openbsd", "useradd": "passwd", "userdel": "passwd"}
IN_CI = os.environ.get("HARDMIX_CI") == "1"
#: The quickstart, shortened: one seed, one epoch (6 trials of one epoch).
SHORT = ["seeds=[0]", "run.optim.epochs=1"]

pytestmark = [pytest.mark.slow]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _run(argv: list[str], seconds: int, log: Path, **kwargs) -> subprocess.CompletedProcess:
    """A subprocess under coreutils `timeout` (which kills its whole process group: ssh, rsync
    and nc children included), its output appended to ``log``."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        return subprocess.run(["timeout", "-k", "10", str(seconds), *argv], stdout=out,
                              stderr=subprocess.STDOUT, text=True, timeout=seconds + 30, **kwargs)


def _tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def _processes(uid: int, marks: tuple[str, ...]) -> dict[int, str]:
    """pid -> command line of every process of the node user, and of every process whose command
    line names one of ``marks`` (the test's folder: sshd's config, the ssh key, the proxy)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            owner = os.stat(f"/proc/{pid}").st_uid
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            continue
        if int(pid) != os.getpid() and cmd and (owner == uid or any(m in cmd for m in marks)):
            found[int(pid)] = cmd
    return found


def _control_dir(cluster_name: str) -> str:
    """Where Ray's SSH command runner keeps this cluster's ControlMaster sockets."""
    import getpass
    import hashlib

    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:HASH_MAX_LENGTH]

    return f"/tmp/ray_ssh_{digest(getpass.getuser())}/{digest(cluster_name)}"


def _node_pip_conf(home: Path, uid: int, gid: int) -> str | None:
    """The package sources of this suite's own pip (its configuration files and PIP_*
    variables: an index mirror, a wheel folder) as the node user's pip.conf, so that the
    node installs from where this machine does. None where there is nothing to copy."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                          text=True, timeout=60)
    wanted = {"index-url", "extra-index-url", "find-links", "trusted-host", "cert"}
    settings: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.partition("=")
        key = name.rsplit(".", 1)[-1]
        if key in wanted:
            settings.setdefault(key, value.strip().strip("'"))
    if not settings:
        return None
    conf = home / ".config" / "pip" / "pip.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    for path in (home / ".config", conf.parent, conf):
        os.chown(path, uid, gid)
    return conf.read_text()


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_gone(uid: int, marks: tuple[str, ...], seconds: float) -> dict[int, str]:
    deadline = time.time() + seconds
    while (left := _processes(uid, marks)) and time.time() < deadline:
        time.sleep(0.5)
    return left


#: PATH of a command that sshd runs (Debian's default for users).
NODE_PATH = "/usr/local/bin:/usr/bin:/bin"


def _node_python_problem() -> str | None:
    """The node's venv (the file's `python3 -m venv`) must be able to load this suite's
    packages: the same Python minor version, and their folder readable by any user."""
    python3 = shutil.which("python3", path=NODE_PATH)
    if python3 is None:
        return f"no python3 on the node's PATH ({NODE_PATH})"
    version = subprocess.run([python3, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    if version != str(sys.version_info[:2]):
        return (f"the node's {python3} is Python {version}, this suite's "
                f"{tuple(sys.version_info[:2])}: its venv cannot load this suite's packages")
    site = Path(sysconfig.get_paths()["purelib"])
    closed = [str(p) for p in (site, *site.parents) if os.stat(p).st_mode & 0o005 != 0o005]
    if closed:
        return f"{closed[0]} is not readable by other users (the node's user reads {site})"
    return None


def _prerequisites() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)})
    problem = None
    if missing:
        problem = (f"`ray up` over SSH needs Debian's {', '.join(missing)} "
                   f"(apt-get install -y {' '.join(missing)}; .ci/run installs them)")
    elif os.geteuid() != 0:
        problem = "`ray up` over SSH needs root (to create the node's user and run sshd)"
    else:
        problem = _node_python_problem()
    if problem:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)


def _substitute(config: dict, *, user: str, key: Path, ssh_port: int, ports: dict[str, int],
                pth: str, ray_script: str) -> list[str]:
    """Put this machine's site-specific values into the parsed ``cluster-local.yaml``; returns
    one line per substitution. Everything else of the file runs as shipped."""
    done = []

    def replace(key_: str, old: str, new: str | None, why: str) -> None:
        commands = config[key_]
        hits = [i for i, c in enumerate(commands) if old in c]
        assert len(hits) == 1, f"{key_}: expected one command with {old!r}: {commands}"
        if new is None:
            del commands[hits[0]]
        else:
            commands[hits[0]] = commands[hits[0]].replace(old, new)
        done.append(f"{key_}: {why}")

    config["cluster_name"] = f"{config['cluster_name']}-{user}"
    done.append("cluster_name: + the test's user, so that Ray's SSH control sockets "
                "(/tmp/ray_ssh_*/<hash of the name>) are this run's own")
    provider = config["provider"]
    provider["head_ip"], provider["worker_ips"] = "127.0.0.1", []
    config["min_workers"] = config["max_workers"] = 0
    done.append("provider.head_ip 127.0.0.1, no worker_ips, min/max_workers 0: this machine "
                "is the only node")
    config["auth"].update(ssh_user=user, ssh_private_key=str(key))
    done.append("auth.ssh_user, auth.ssh_private_key: the test's user and key")
    # Ray's SSH command runner has no port option (command_runner.SSHOptions: no Port, and ssh
    # reads ~/.ssh/config from the passwd home, not $HOME); its ProxyCommand is the way.
    config["auth"]["ssh_proxy_command"] = f"nc %h {ssh_port}"
    done.append(f"auth.ssh_proxy_command: the test's sshd listens on port {ssh_port}, not 22")
    # Torch and the rest are 5 GB to download: the node's venv sees this suite's packages
    # through a .pth file; pip then installs only what they lack (hardmix itself, editable).
    # Packages found that way bring no console scripts: `ray` (the start commands call it) is
    # copied from this suite's venv with the node venv's interpreter in its #! line.
    replace("setup_commands", "python3 -m venv ~/venv",
            f"{{ python3 -m venv ~/venv && echo {pth} > "
            f"~/venv/lib/python3.{sys.version_info.minor}/site-packages/ci-venv.pth && "
            f"sed \"1s|.*|#!$HOME/venv/bin/python|\" {ray_script} > ~/venv/bin/ray && "
            f"chmod +x ~/venv/bin/ray; }}",
            "the venv also sees the test suite's site-packages (.pth) and gets its `ray` "
            "script: no 5 GB torch download")
    # No internet: the CIFAR download step goes (the quickstart reads scikit-learn's digits).
    replace("setup_commands", "CIFAR10, CIFAR100", None,
            "CIFAR-10/100 download dropped: offline, and the quickstart does not read CIFAR")
    # Other Ray instances of this machine (the suite's own, other test runs) hold Ray's default
    # ports: every port the head opens is a free one.
    start = "head_start_ray_commands"
    replace(start, "--port=6379", f"--port={ports['gcs']}", "GCS port: a free one")
    replace(start, "--object-manager-port=8076", f"--object-manager-port={ports['om']}",
            "object manager port: a free one")
    replace(start, "--node-manager-port=8077",
            f"--node-manager-port={ports['nm']} --dashboard-port={ports['dash']} "
            f"--ray-client-server-port={ports['client']} "
            f"--dashboard-agent-listen-port={ports['agent']} "
            f"--dashboard-agent-grpc-port={ports['agent_grpc']} "
            f"--runtime-env-agent-port={ports['renv']} --metrics-export-port={ports['metrics']} "
            f"--object-store-memory={200 * 1024 ** 2}",
            "node manager, dashboard, client, agent and metrics ports: free ones; a 200 MiB "
            "object store on a shared machine")
    return done


def test_ray_up_job_submit_and_ray_down_on_an_ssh_node():
    _prerequisites()
    t_start = time.time()
    root = Path(tempfile.mkdtemp(prefix="hmru-", dir="/tmp"))  # short: Ray's socket paths
    root.chmod(0o755)
    user = f"hmru{os.getpid()}"
    log = root / "log.txt"
    sshd = None
    uid = -1
    cluster_file = root / "cluster-local.yaml"
    up_started = down_done = False
    try:
        # -- the node: an unprivileged user with a fresh home (Debian's /etc/skel) ------------
        home = root / "home"
        proc = _run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash",
                     "--password", "*", user], 30, log)
        assert proc.returncode == 0, _tail(log)
        uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
        # What marks a process as this test's: the node user's uid (Ray, the job, sshd's session
        # child), and in the command line the test's folder (sshd), the user's name (sshd's
        # privileged session process) or Ray's SSH control folder of this cluster (ssh's master).
        marks = (str(root), f"sshd: {user}", _control_dir(f"hardmix-onprem-{user}"))
        node_tmp = root / "node-tmp"
        store = root / "store"
        for folder in (node_tmp, store, home / ".ssh"):
            folder.mkdir(mode=0o700)
            os.chown(folder, uid, gid)
        # The node's Ray temp folder (sessions, ray_current_cluster) is its own, in its shell
        # profile as a site would set it; `--address auto` in the job reads it from there.
        with (home / ".bashrc").open("a") as f:
            f.write(f"\nexport RAY_TMPDIR={node_tmp}\n")
        # The node's pip installs from where this machine's does (offline: a local mirror).
        pip_conf = _node_pip_conf(home, uid, gid)

        # -- keys and sshd -------------------------------------------------------------------
        keys = root / "keys"
        keys.mkdir(mode=0o700)
        for name in ("host", "user"):
            proc = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hardmix-{name}",
                         "-f", str(keys / name)], 30, log)
            assert proc.returncode == 0, _tail(log)
        authorized = home / ".ssh" / "authorized_keys"
        authorized.write_text((keys / "user.pub").read_text())
        authorized.chmod(0o600)
        os.chown(authorized, uid, gid)
        ssh_port, *free = _free_ports(10)
        ports = dict(zip(("gcs", "om", "nm", "dash", "client", "agent", "agent_grpc", "renv",
                          "metrics"), free))
        config_text = "\n".join([
            f"Port {ssh_port}", "ListenAddress 127.0.0.1", f"HostKey {keys / 'host'}",
            f"PidFile {root / 'sshd.pid'}", f"AllowUsers {user}", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin no", "StrictModes yes", "MaxStartups 50", "MaxSessions 50",
            "LogLevel VERBOSE", ""])
        (root / "sshd_config").write_text(config_text)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                                stdout=(root / "sshd.log").open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", ssh_port)) == 0:
                    break
            assert sshd.poll() is None and time.time() < deadline, _tail(root / "sshd.log")
            time.sleep(0.2)

        # -- the launching machine: its own HOME (token, caches) and temp folders -------------
        launcher = root / "launcher"
        launcher.mkdir(mode=0o700)
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(launcher), TMPDIR=str(launcher), RAY_TMPDIR=str(launcher),
                   RAY_AUTH_MODE="token", PATH=f"{bin_dir}:{os.environ['PATH']}",
                   RAY_USAGE_STATS_ENABLED="0",
                   # as docs/cluster-setup.md step 4 exports it: .git travels with the job
                   RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES=".venv,venv,__pycache__")
        # As the file's header says: the cluster's token, once, on the launching machine.
        proc = _run(["ray", "get-auth-token", "--generate"], 120, log, env=env)
        assert proc.returncode == 0 and (launcher / ".ray/auth_token").is_file(), _tail(log)

        site_packages = sysconfig.get_paths()["purelib"]  # this suite's packages
        config = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
        done = _substitute(config, user=user, key=keys / "user", ssh_port=ssh_port,
                           ports=ports, pth=site_packages,
                           ray_script=str(Path(sys.executable).parent / "ray"))
        cluster_file.write_text(yaml.safe_dump(config, sort_keys=False))
        print("substituted in cluster-local.yaml:\n  " + "\n  ".join(done))
        print(f"the node user's pip.conf (this machine's package sources): {pip_conf}")

        # -- ray up: every setup command of the file runs on the node --------------------------
        up_started = True
        t0 = time.time()
        proc = _run(["ray", "up", "-y", str(cluster_file)], 900, log, cwd=REPO, env=env)
        t_up = time.time() - t0
        assert proc.returncode == 0, _tail(log)
        assert (home / "hardmix/pyproject.toml").is_file()  # file_mounts: the repository
        assert (home / ".ray/auth_token").read_text() == (launcher / ".ray/auth_token").read_text()
        assert "# hardmix venv" in (home / ".bashrc").read_text()  # the command once cut

        # -- the quickstart, submitted as the docs do ------------------------------------------
        from hardmix.train import git_commit

        submitted = git_commit()  # what the working dir holds as it is uploaded
        t0 = time.time()
        overrides = [x for o in [*SHORT, f"storage={store}"] for x in ("--set", o)]
        proc = _run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{ports['dash']}",
                     "--working-dir", ".", "--", "hardmix", "sweep", "--preset", "quickstart",
                     "--address", "auto", *overrides], 900, log, cwd=REPO, env=env)
        t_job = time.time() - t0
        assert proc.returncode == 0 and "succeeded" in _tail(log, 3000), _tail(log)

        from ablations.store import read_results
        from hardmix.config import SweepConfig, load_config

        quick = load_config(SweepConfig, preset="quickstart", overrides=SHORT)
        res = read_results(str(store / quick.name))
        trials, epochs = res.trials.to_pandas(), res.epochs.to_pandas()
        assert len(trials) >= 4 and set(trials.status) == {"completed"}, trials
        assert set(trials.seed) == {0}
        assert sorted(epochs.epoch.unique()) == [1] and len(epochs) == len(trials)
        assert (store / quick.name / "report/report.md").is_file()
        # Every row names the code that produced it: the commit of what was submitted (here,
        # this checkout: "+modified" when it is not clean), not the node's copy without .git.
        assert set(trials.git_commit) == {submitted}, set(trials.git_commit)

        # -- ray down, and nothing left behind ------------------------------------------------
        t0 = time.time()
        proc = _run(["ray", "down", "-y", str(cluster_file)], 300, log, cwd=REPO, env=env)
        down_done = True
        t_down = time.time() - t0
        assert proc.returncode == 0, _tail(log)
        # Nothing of Ray on the node: every process of its user is gone but the SSH session
        # that ssh's control master keeps open for 10 s (ControlPersist, Ray's setting).
        deadline = time.time() + 30
        while (ray_left := {p: c for p, c in _processes(uid, ()).items()
                            if not c.startswith("sshd:")}) and time.time() < deadline:
            time.sleep(0.5)
        assert ray_left == {}, ray_left
        # Then the SSH side: end the control master (rather than wait out its 10 s) and sshd.
        for pid, cmd in _processes(-1, (marks[2],)).items():
            os.kill(pid, signal.SIGTERM)
        sshd.terminate()
        sshd.wait(timeout=20)
        assert _wait_gone(uid, marks, 15) == {}
        print(f"ray up {t_up:.0f} s, job {t_job:.0f} s, ray down {t_down:.0f} s, "
              f"test {time.time() - t_start:.0f} s")
    finally:
        if up_started and not down_done:
            launch_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            launch_env.update(HOME=str(root / "launcher"), TMPDIR=str(root / "launcher"),
                              RAY_TMPDIR=str(root / "launcher"))
            _run(["ray", "down", "-y", str(cluster_file)], 300, log, cwd=REPO, env=launch_env)
        if sshd is not None and sshd.poll() is None:
            sshd.terminate()
            try:
                sshd.wait(timeout=20)
            except subprocess.TimeoutExpired:
                sshd.kill()
        if uid >= 0:
            _kill(_processes(uid, marks))  # only the test's user and the test's sshd/ssh/nc
            _wait_gone(uid, marks, 10)
        subprocess.run(["userdel", user], capture_output=True, timeout=30)
        shutil.rmtree(_control_dir(f"hardmix-onprem-{user}"), ignore_errors=True)
        if not os.environ.get("HARDMIX_KEEP_RAY_UP"):  # set it to look at the logs after
            shutil.rmtree(root, ignore_errors=True)
