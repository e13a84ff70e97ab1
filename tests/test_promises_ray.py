"""The README's and docs' promises that need Ray (issue 31): the main job as documented (also
with the network blocked), its progress line and printed paths, a search with seeds and a
follow-up interrupted and resumed, every trial failing, ``OMP_WAIT_POLICY`` in the trials,
fractional GPUs on a head with a logical GPU, and ``ray job submit`` against a token-auth
head (and Ray Client, ``ray://``).

docs/claims.md maps every promise to its test.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promise_helpers import REPO, env, hardmix, probe_env, probe_records

pytestmark = pytest.mark.ray


def _results(path):
    from ablations.store import read_results
    return read_results(str(path)).to_pandas()


def _raw(path, table: str):
    """Every row ever written (no deduplication), as the README's pandas example reads them."""
    import pandas as pd
    return pd.read_parquet(Path(path) / table)


# --------------------------------------------------------------------------------------------
# The main job: `hardmix sweep --preset quickstart`, shortened
# --------------------------------------------------------------------------------------------

QUICK = ["--set", "seeds=[0]", "--set", "run.optim.epochs=1"]


def _can_block_network() -> str | None:
    """Why the network cannot be blocked here (None when ``unshare -n`` works)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip is not installed"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -n is not permitted ({probe.stderr.strip()})"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The README's main job in a subprocess, with one seed and one epoch into a temporary
    storage; with the network blocked (a network namespace with only loopback) where this
    machine allows it. Every process records the environment it started with."""
    tmp = tmp_path_factory.mktemp("quickstart")
    why = _can_block_network()
    # Inside the namespace: loopback up (Ray listens there), then prove nothing else is reachable.
    check = (f"{sys.executable} -c \"import socket; s = socket.socket(); s.settimeout(3); "
             "print('network', s.connect_ex(('1.1.1.1', 443)))\"")
    prefix = () if why else ("unshare", "-n", "sh", "-c",
                             f'ip link set lo up && {check} && exec "$0" "$@"')
    e = env(**probe_env(tmp))
    e.pop("OMP_WAIT_POLICY", None)  # what the command sets, not what this shell had
    start = time.time()
    proc = hardmix("sweep", "--preset", "quickstart", *QUICK, "--set", f"storage={tmp}",
                   timeout=400, cwd=tmp, env_=e, prefix=prefix)
    return {"proc": proc, "dir": tmp / "quickstart", "blocked": why is None, "why": why,
            "tmp": tmp, "wall": time.time() - start}


def test_main_job_runs_as_documented(quickstart):
    """Exit 0; every planned trial completed with its rows; the report's main table printed and
    written; the printed paths exist; the printed best is the lowest validation error."""
    proc, sweep = quickstart["proc"], quickstart["dir"]
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    from hardmix.config import SweepConfig, load_config
    from tune.outcome import planned_trials

    cfg = load_config(SweepConfig, "quickstart", None, ["seeds=[0]", "run.optim.epochs=1"])
    trials, epochs = _results(sweep)
    assert sorted(trials.trial_id) == sorted(planned_trials(cfg)) and len(trials) == 6
    assert set(trials.status) == {"completed"} and (trials.epochs_run == 1).all()
    assert sorted(epochs.trial_id) == sorted(trials.trial_id) and set(epochs.epoch) == {1}
    assert (trials["data.name"] == "digits").all()

    # The main table: one printed line per variant, the same rows as report/main_table.csv.
    import pandas as pd

    table = pd.read_csv(sweep / "report" / "main_table.csv")
    assert len(table) == 6 and {"none", "cutmix"} <= set(table.method)
    header = next(i for i, ln in enumerate(out.splitlines()) if ln.strip().startswith("variant"))
    printed = out.splitlines()[header + 1:header + 1 + len(table)]
    for line, variant in zip(printed, table.variant):
        assert line.strip().startswith(variant), (line, variant)
    assert (sweep / "report" / "report.md").is_file()
    assert "## Main table" in (sweep / "report" / "report.md").read_text()

    # Where everything is, as printed
    paths = dict(re.findall(r"^  (Parquet|TensorBoard|report)\s+(.+)$", out, re.M))
    assert paths["Parquet"].split() == [str(sweep / "trials"), str(sweep / "epochs")]
    assert paths["TensorBoard"] == f"tensorboard --logdir {sweep / 'runs'}"
    assert paths["report"] == str(sweep / "report" / "report.md")
    for t in trials.trial_id:
        assert list((sweep / "runs" / t).glob("*/events.out.tfevents.*")), t  # <trial>/<name>/
    assert (sweep / "sweep.yaml").is_file() and (sweep / "sweep_state.json").is_file()

    # outcome.best: the completed trial with the lowest validation error
    m = re.search(r"^  best\s+(\S+)\s+val_top1_err ([\d.]+)", out, re.M)
    assert m, out
    lowest = trials.final_val_top1_err.min()
    assert float(m.group(2)) == pytest.approx(lowest, abs=0.005)
    assert trials.set_index("trial_id").final_val_top1_err[m.group(1)] == lowest
    assert f"best val_top1_err {lowest:.2f} ({m.group(1)}" in out  # the progress line agrees


def test_report_command_options_on_the_main_jobs_sweep(quickstart, tmp_path, capsys):
    """``hardmix report PATH --out --baseline --family --correction`` on the sweep the main job
    left: the report is written where asked, compared against the named baseline, over the
    named family only, and says that no correction was applied."""
    from hardmix.cli import main

    sweep = quickstart["dir"]
    out = tmp_path / "paper"
    assert main(["report", str(sweep), "--out", str(out), "--baseline", "none", "--family",
                 "method", "--correction", "none"]) == 0
    assert "variant" in capsys.readouterr().out
    import pandas as pd

    diffs = pd.read_csv(out / "differences.csv")
    assert set(diffs.reference) == {"none"} and len(diffs)  # against the named baseline
    family = re.search(r"^Family: top-1 error, (.*)$", (out / "report.md").read_text(), re.M)
    assert family, "no primary family line"
    assert "contrasts over method" in family.group(1) and "uncorrected" in family.group(1)


def test_main_job_needs_no_network(quickstart):
    if not quickstart["blocked"]:
        pytest.skip(f"the network could not be blocked here: {quickstart['why']}")
    proc = quickstart["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trials, _ = _results(quickstart["dir"])
    assert len(trials) == 6 and set(trials.status) == {"completed"}, trials.error.tolist()
    # the probe inside the namespace could not reach an outside address
    m = re.search(r"^network (\d+)$", proc.stdout, re.M)
    assert m and int(m.group(1)) != 0, proc.stdout


def test_progress_line_is_the_one_the_readme_shows(quickstart):
    """Plain lines when piped: one per trial that ends, then the status line in the README's
    format, ending with every trial ended and an ETA of zero."""
    readme = (REPO / "README.md").read_text()
    shown = re.search(r"^\[quickstart\] .*$", readme, re.M).group(0)
    # the README's line with its numbers and the best trial's name as placeholders
    head, trial, tail = re.match(r"^(.*\()(c\d{3}-s\d+[^)]*)(\).*)$", shown).groups()
    number = lambda part: re.sub(r"\d+(\\\.\d+)?", lambda m: r"\d+(?:\.\d+)?",
                                 re.escape(part))
    pattern = number(head) + r"c\d{3}-s\d+[^)]*" + number(tail)
    status = [ln for ln in quickstart["proc"].stdout.splitlines() if ln.startswith("[quickstart]")]
    assert status, quickstart["proc"].stdout
    final = status[-1]
    assert re.fullmatch(pattern, final), (pattern, final)
    assert final.startswith("[quickstart] 0 running, 6 done, 0 failed of 6") and \
        "6/6 ended" in final and final.endswith("ETA 0m00s")
    ended = [ln for ln in quickstart["proc"].stdout.splitlines() if ln.startswith("  done ")]
    assert len(ended) == 6 and len({ln.split()[1] for ln in ended}) == 6


def test_omp_wait_policy_reaches_the_trials(quickstart):
    """The command sets OMP_WAIT_POLICY=PASSIVE (the test's environment has none) and every
    Ray worker that ran a trial started with it."""
    records = probe_records(quickstart["tmp"])
    workers = [r for r in records if r["argv0"].endswith("default_worker.py")]
    assert workers, records
    assert {r["OMP_WAIT_POLICY"] for r in workers} == {"PASSIVE"}, workers


# --------------------------------------------------------------------------------------------
# Exit code 1 when every trial fails
# --------------------------------------------------------------------------------------------

TINY = ["run.data.name=synthetic", "run.model.name=smallnet", "run.model.width=8",
        "run.data.batch_size=64", "run.device=cpu", "run.output.checkpoint_every=1",
        "run.output.image_grid=false", "report=false"]


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_sweep_whose_every_trial_fails_exits_1_with_failed_rows(tmp_path, ray_local):
    address = ray_local.get_runtime_context().gcs_address
    proc = hardmix("sweep", *_sets(f"storage={tmp_path}", "name=allfail", f"address={address}",
                                   "mode=grid", "seeds=[0]", "max_failures=0",
                                   "run.optim.epochs=1", "run.optim.lr=1e30", *TINY),
                   timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 trials: 0 completed, 0 pruned, 1 failed" in proc.stdout
    trials, _ = _results(tmp_path / "allfail")
    assert list(trials.status) == ["failed"] and "FloatingPointError" in trials.error.iloc[0]


# --------------------------------------------------------------------------------------------
# A search with seeds and a follow-up, interrupted and resumed
# --------------------------------------------------------------------------------------------


def _epochs_of(sweep: Path) -> dict[str, list[int]]:
    try:
        _, epochs = _results(sweep)
    except Exception:  # noqa: BLE001 - nothing written yet
        return {}
    return {t: sorted(g.epoch) for t, g in epochs.groupby("trial_id")}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_interrupted_search_with_followup_resumes_each_trial_once(tmp_path, ray_local):
    """Interrupted while a configuration has one seed done and the other running: the resume
    finishes that configuration's seed (same parameters), asks Optuna for the rest, then runs
    the follow-up once. Every (configuration, seed) has one completed trial, finished trials
    write nothing new, every epoch row is there once, and no configuration is added."""
    address = ray_local.get_runtime_context().gcs_address
    sweep = tmp_path / "search"
    args = _sets(f"storage={tmp_path}", "name=search", f"address={address}", "mode=search",
                 "num_samples=2", "seeds=[0,1]", "followup.top=1", "followup.seeds=[5]",
                 "max_concurrent_trials=1", "max_failures=0", "run.optim.epochs=20",
                 "scheduler.type=none", *TINY)
    exe = str(Path(sys.executable).with_name("hardmix"))
    first = subprocess.Popen([exe, "sweep", *args], cwd=REPO, env=env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        done = _epochs_of(sweep)
        if len(done.get("c000-s0", [])) == 20 and len(done.get("c000-s1", [])) >= 2:
            break
        time.sleep(0.3)
    assert first.poll() is None, "the search ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 130, out
    before, _ = _results(sweep)
    status = dict(zip(before.trial_id, before.status))
    assert status["c000-s0"] == "completed" and status["c000-s1"] == "running", status
    assert not (sweep / "followup.json").exists()
    kept = {p.name for p in sweep.rglob("c000-s0-*.parquet")}
    params0 = before.set_index("trial_id").loc["c000-s0", ["augment.alpha", "augment.criterion"]]

    resumed = hardmix("sweep", "--resume", str(sweep), "--set", f"address={address}",
                      timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resume: finishing 1 trials of 1 started configurations" in resumed.stdout
    trials, epochs = _results(sweep)
    assert sorted(trials.trial_id) == ["c000-s0", "c000-s1", "c001-s0", "c001-s1", "f000-s5"]
    assert set(trials.status) == {"completed"}
    rows = trials.set_index("trial_id")
    # one configuration, one set of parameters, whichever driver ran its seeds
    assert rows.loc["c000-s1", "augment.alpha"] == params0["augment.alpha"]
    assert rows.loc["c000-s1", "augment.criterion"] == params0["augment.criterion"]
    # the finished trial was not run again; every trial's epochs once
    assert {p.name for p in sweep.rglob("c000-s0-*.parquet")} == kept
    for t in rows.index:
        assert sorted(epochs[epochs.trial_id == t].epoch) == list(range(1, 21)), t
    raw = _raw(sweep, "trials")
    starts = raw[raw.status == "running"].groupby("trial_id").size()
    assert starts.drop("c000-s1").eq(1).all(), starts  # one start each; c000-s1 two (resumed)
    assert starts["c000-s1"] == 2
    # the follow-up: once, with the configuration of the lowest mean validation error
    follow = json.loads((sweep / "followup.json").read_text())
    assert len(follow) == 1
    main = trials[trials.trial_id.str.startswith("c")]
    means = main.groupby(main.trial_id.str[:4]).final_val_top1_err.mean()
    best = means.idxmin()
    assert rows.loc["f000-s5", "augment.alpha"] == rows.loc[f"{best}-s0", "augment.alpha"]
    assert starts["f000-s5"] == 1


# --------------------------------------------------------------------------------------------
# A head of our own: token authentication, a logical GPU, the job API and Ray Client
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(token: str | None, home: Path) -> dict:
    e = env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HOME=str(home))
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        e.pop(k, None)
    if token is None:
        e["RAY_AUTH_MODE"] = "disabled"
    else:
        e.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return e


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """``ray start --head`` on 127.0.0.1 with token authentication, 4 CPUs and one logical GPU
    (no hardware), its dashboard (job API) and Ray Client server, in a process group of its
    own that is killed at the end (never `ray stop`, which would stop every Ray here)."""
    if shutil.which("ray", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("the ray command is not installed")
    try:
        import aiohttp  # noqa: F401 - the dashboard's job API needs ray[default]
    except ImportError:
        pytest.skip('ray[default] is not installed (pip install -e ".[dev]")')
    tmp = tmp_path_factory.mktemp("head")
    home = tmp / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    # Every fixed default port of a head (the agent's 52365, metrics, ...) is taken while
    # another Ray runs here (this session's own, say): free ones for all of them.
    ports = {k: _free_port() for k in ("gcs", "dashboard", "client", "agent", "agent-grpc",
                                       "metrics", "runtime-env", "node-manager", "object-manager")}
    temp_dir = Path("/tmp") / f"hm-{secrets.token_hex(3)}"  # short: Ray's socket paths are limited
    ray = str(Path(sys.executable).with_name("ray"))
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={ports['dashboard']}", "--include-dashboard=true",
         f"--ray-client-server-port={ports['client']}",
         f"--dashboard-agent-listen-port={ports['agent']}",
         f"--dashboard-agent-grpc-port={ports['agent-grpc']}",
         f"--metrics-export-port={ports['metrics']}",
         f"--runtime-env-agent-port={ports['runtime-env']}",
         f"--node-manager-port={ports['node-manager']}",
         f"--object-manager-port={ports['object-manager']}", "--num-cpus=4", "--num-gpus=1",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=_ray_env(token, home), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (tmp / "head.log").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", ports["dashboard"])) == 0:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError("the head's dashboard did not start")
        yield {"token": token, "home": home, "url": url, "tmp": tmp,
               "gcs": f"127.0.0.1:{ports['gcs']}", "client": f"ray://127.0.0.1:{ports['client']}"}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=20)
                time.sleep(2)  # daemons of the group exit after their parent
            except subprocess.TimeoutExpired:
                pass
        log.close()
        for err in temp_dir.glob("session_*/logs/ray_client_server*.err"):
            shutil.copy(err, tmp / err.name)  # kept beside head.log for a failure's reader
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_cli(head, *args: str, token: str | None, timeout: float = 300):
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, *args], cwd=REPO, env=_ray_env(token, head["home"]),
                          capture_output=True, text=True, timeout=timeout)


#: The quickstart cut to two trials (none, CutMix), one seed, one epoch, on the CPU.
SMALL = ["--preset", "quickstart", *QUICK, "--set", "space.augment.criterion=null",
         "--set", "space.augment.fallback=null", "--set", "space.augment.method.values=[none,cutmix]",
         "--set", "run.device=cpu", "--set", "report=false"]
JOB = ["hardmix", "sweep", *SMALL, "--address", "auto"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_job_submit_runs_the_sweep_on_a_token_head_and_refuses_no_token(head, tmp_path):
    """The documented submit (docs/cluster-setup.md): ``ray job submit --address
    http://127.0.0.1:8265 --working-dir . --no-wait -- hardmix sweep ... --address auto``;
    the job succeeds and writes its trials. Without the token, or with another, the job API
    refuses the same submit."""
    storage = tmp_path / "jobs"
    job = [*JOB, "--storage", str(storage)]
    for token in (None, secrets.token_hex(32)):
        refused = _ray_cli(head, "job", "submit", "--address", head["url"], "--working-dir", ".",
                           "--no-wait", "--", *job, token=token, timeout=120)
        assert refused.returncode != 0, refused.stdout
        assert "Unauthorized" in refused.stdout + refused.stderr or \
            "AuthenticationError" in refused.stdout + refused.stderr
    assert not storage.exists()

    deadline = time.time() + 120
    while True:  # a fresh head's job agent registers a little after the dashboard opens
        sub = _ray_cli(head, "job", "submit", "--address", head["url"], "--working-dir", ".",
                       "--no-wait", "--", *job, token=head["token"])
        if sub.returncode == 0 or "No available agent" not in sub.stdout + sub.stderr or \
                time.time() > deadline:
            break
        time.sleep(3)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = re.search(r"Job '([^']+)' submitted successfully", sub.stdout + sub.stderr).group(1)
    logs = _ray_cli(head, "job", "logs", "--address", head["url"], "--follow", job_id,
                    token=head["token"])
    status = _ray_cli(head, "job", "status", "--address", head["url"], job_id,
                      token=head["token"], timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower(), logs.stdout + status.stdout
    assert "2 trials: 2 completed" in logs.stdout
    trials, _ = _results(storage / "quickstart")
    assert sorted(trials.trial_id) == ["c000-s0", "c001-s0"] and set(trials.status) == {"completed"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sweep_through_ray_client_address(head, tmp_path):
    """``--address ray://host:10001`` (docs/cli.md, docs/sweeps.md) runs the sweep through
    Ray Client: every trial completes and lands in the store."""
    proc = hardmix("sweep", *SMALL, "--address", head["client"],
                   "--storage", str(tmp_path), timeout=360,
                   env_=_ray_env(head["token"], head["home"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trials, _ = _results(tmp_path / "quickstart")
    assert sorted(trials.trial_id) == ["c000-s0", "c001-s0"] and set(trials.status) == {"completed"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_fractional_gpus_pack_four_trials_onto_one_gpu(head, tmp_path):
    """``resources.gpus=0.25`` on a head with one (logical) GPU and ``run.device=cpu``: four
    trials run at the same time (each trial's start row is written before any trial's final
    row), so none waited for a whole GPU."""
    proc = hardmix("sweep", *_sets(f"storage={tmp_path}", "name=pack", f"address={head['gcs']}",
                                   "mode=grid", "seeds=[0,1,2,3]", "resources.gpus=0.25",
                                   "resources.cpus=1", "max_concurrent_trials=0",
                                   "max_failures=0", "run.optim.epochs=40", *TINY),
                   timeout=360, env_=_ray_env(head["token"], head["home"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = _raw(tmp_path / "pack", "trials")
    assert set(raw.trial_id) == {f"c000-s{s}" for s in range(4)}
    start = raw[raw.status == "running"].groupby("trial_id").written_at.min()
    end = raw[raw.status == "completed"].groupby("trial_id").written_at.min()
    assert len(start) == len(end) == 4
    assert start.max() < end.min(), (start.sort_values(), end.sort_values())
