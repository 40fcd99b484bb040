"""``fedmqtt simulate``: a whole federated run on one machine, with real processes and a real broker.

It starts a broker (unless ``--broker`` is given), one coordinator process, ``--aggregators N`` aggregator worker
processes (scale-out aggregation; none by default) and the device processes (``--devices-per-process`` devices
packed per process, each its own MQTT client), shows the rounds live
(the ``fedmqtt watch`` state and renderer), and writes ``report.json`` + ``report.png`` into ``--out``.

Every child runs in its own process group, with its output in a log file of the out directory. On any way
out -- the job finishing, an error, Ctrl-C (SIGINT) or SIGTERM -- the children are terminated, waited for,
and killed if they do not exit in time, so no process is left behind.

The pure parts (:func:`plan_simulation`, :func:`device_ranges`, the command builders) take values and
return values -- except that :func:`plan_simulation` finds the data with :func:`fedmqtt.data.resolve_data_dir`,
which may download it into the user cache; :class:`Supervisor` and :func:`run_simulation` do the I/O.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from fedmqtt import settings as S
from fedmqtt.coordinator.config import SETTINGS as COORDINATOR_SETTINGS
from fedmqtt.coordinator.config import CoordinatorConfig, write_config
from fedmqtt.errors import ConfigError, FedmqttError
from fedmqtt.extras import require
from fedmqtt.mqtt.settings import BROKER_FLAGS
from fedmqtt.paths import require_input_dir, require_output_dir
from fedmqtt.topics import Topics

if TYPE_CHECKING:
    from fedmqtt.mqtt.settings import BrokerSettings

DEVICE_ID_PREFIX = "dev-"
AGGREGATOR_ID_PREFIX = "agg-"  # simulate's aggregator workers: agg-1 ... agg-N
# Without --devices-per-process, devices are spread over at most this many processes.
DEFAULT_MAX_DEVICE_PROCESSES = 16
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 30


class SimulateError(FedmqttError):
    """The simulation could not run to the end (a child failed, no data, ...)."""


class SimulationInterrupted(Exception):
    """SIGINT or SIGTERM arrived; everything is being stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------------
# The pure plan
# ---------------------------------------------------------------------------------------------------


def device_ranges(num_devices: int, per_process: int) -> list[tuple[int, int]]:
    """Device index ranges [a, b) of each process: ``ceil(num_devices / per_process)`` of them."""
    if num_devices < 1 or per_process < 1:
        raise ValueError("num_devices and per_process must be >= 1")
    return [(a, min(a + per_process, num_devices)) for a in range(0, num_devices, per_process)]


def default_devices_per_process(num_devices: int, cpu_count: int) -> int:
    """Two device processes per core (at most 16 processes).

    A process trains its selected devices one after another on one thread. One process per core would
    leave a core idle whenever the parts are unequal (the demo's dirichlet:0.5 split gave two processes
    37,118 and 22,882 samples); two per core lets the scheduler even that out. Many more would only add
    memory: each process holds torch and the data set, ~1 GB resident.
    """
    processes = max(1, min(2 * cpu_count, DEFAULT_MAX_DEVICE_PROCESSES, num_devices))
    return math.ceil(num_devices / processes)


def check_devices_per_process(per_process: int, limit: int) -> int:
    """``limit``: :func:`fedmqtt.mqtt.max_clients_per_process` (a process's virtual devices share one network
    loop; each holds one socket)."""
    from fedmqtt.mqtt.netloop import SPARE_FDS

    if per_process < 1:
        raise ConfigError("--devices-per-process", f"must be >= 1, got {per_process}")
    if per_process > limit:
        raise ConfigError(
            "--devices-per-process",
            f"{per_process} is above the limit of {limit} MQTT clients per process (one open file each: the "
            f"open-file limit, `ulimit -n`, less {SPARE_FDS} spare); use at most {limit}, which starts more "
            "processes, or raise the limit",
        )
    return per_process


@dataclass(frozen=True)
class SimulationPlan:
    """Every resolved setting of one simulation; ``config`` of the report."""

    job: str
    prefix: str
    devices: int
    rounds: int
    devices_per_process: int
    device_processes: int
    threads_per_process: int
    min_updates: int
    min_devices: int
    round_timeout: float
    devices_per_round: int | None
    dataset: str
    data_dir: str
    partition: str
    model: str
    local_epochs: int
    batch_size: int
    lr: float
    uplink: str
    seed: int
    out_dir: str
    broker: str  # "mosquitto", "embedded" or the URL given with --broker
    mqtt_version: str
    # The coordinator's job, validated before anything starts; written to OUT/coordinator.toml for --config.
    coordinator: CoordinatorConfig | None = None
    timeout: float | None = None
    train_seed: int | None = None  # --train-seed, passed on to the device processes
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    aggregators: int = 0  # --aggregators: worker processes simulate starts (fedmqtt aggregator)

    def report_config(self) -> dict[str, Any]:
        config = asdict(dataclasses.replace(self, coordinator=None))
        config.pop("password")
        if self.coordinator is not None:
            config["coordinator"] = self.coordinator.model_dump(mode="json", exclude=set(BROKER_FLAGS))
        return config


# The coordinator settings simulate offers, derived from CoordinatorConfig: all but those simulate sets itself
# (the broker connection, which it starts or is given; --eval-data from --data-dir; output and take-over).
_NOT_OFFERED = {*BROKER_FLAGS, "client_id", "eval_data", "quiet", "resume", "take_over", "reconnect_grace"}
SIMULATE_SETTINGS: list[S.Setting] = [s for s in COORDINATOR_SETTINGS if s.name not in _NOT_OFFERED]
# Defaults simulate derives from --devices (shown in --help; the rest are the coordinator's own defaults).
_SIMULATE_DEFAULTS = {
    "job": "sim-YYYYmmdd-HHMMSS",
    "min_updates": "all selected devices",
    "min_devices": "--devices",
    "dp_population": "--devices",
}
CONFIG_FILE = "coordinator.toml"


def plan_simulation(
    args: argparse.Namespace,
    *,
    env: Mapping[str, str],
    max_clients_per_process: int,
    cpu_count: int,
    now: float,
) -> SimulationPlan:
    """Validate the flags and resolve every default. Raises :class:`ConfigError` naming the flag."""
    if args.devices < 1:
        raise ConfigError("--devices", f"must be >= 1, got {args.devices}")
    given = {**S.from_env(env, SIMULATE_SETTINGS), **S.from_flags(args, SIMULATE_SETTINGS)}
    job = str(given.get(("job",)) or time.strftime("sim-%Y%m%d-%H%M%S", time.localtime(now)))
    requested = args.devices_per_process
    per_process = check_devices_per_process(
        default_devices_per_process(args.devices, cpu_count) if requested is None else requested,
        max_clients_per_process,
    )
    ranges = device_ranges(args.devices, per_process)
    per_round = _int_or_none(given.get(("devices_per_round",)), "--devices-per-round")
    if per_round is not None and not 1 <= per_round <= args.devices:
        raise ConfigError("--devices-per-round", f"must be between 1 and --devices ({args.devices})")
    selectable = per_round or args.devices
    min_updates = _int_or_none(given.get(("min_updates",)), "--min-updates") or selectable
    if not 1 <= min_updates <= selectable:
        raise ConfigError("--min-updates", f"must be between 1 and the devices selected per round ({selectable})")
    min_devices = _int_or_none(given.get(("min_devices",)), "--min-devices") or args.devices
    if not min_updates <= min_devices <= args.devices:
        raise ConfigError("--min-devices", f"must be between --min-updates ({min_updates}) and --devices")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout", "must be > 0 seconds")
    if args.embedded and args.broker:
        raise ConfigError("--embedded", "cannot be combined with --broker (which broker should it use?)")
    from fedmqtt.mqtt.settings import broker_settings_from_args

    # The broker flags (URL, credentials, CA file), before anything starts; the password is resolved here once
    # (--password, --password-file, the URL or $FEDMQTT_PASSWORD) and reaches the children by their environment.
    connection = broker_settings_from_args(args, env=env)

    # Every file flag is checked here, before a broker or a child starts (the children would only fail later).
    require_output_dir("--out", args.out)
    require_input_dir("--data-dir", args.data_dir)
    # The coordinator's whole job, validated here (a bad --strategy or DP setting fails before a broker or a
    # process starts). simulate's own defaults sit below the environment and the flags.
    defaults: dict[tuple[str, ...], Any] = {("job",): job, ("min_updates",): min_updates, ("min_devices",): min_devices}
    if str(given.get(("dp", "mode"), "off")) != "off":
        defaults[("dp", "population")] = args.devices  # the sample rate then defaults to per_round / devices
    data = S.merge(defaults, given, {("quiet",): True})
    coordinator = S.validate(CoordinatorConfig, data, COORDINATOR_SETTINGS, context={"env": {}})
    from fedmqtt.data import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir, coordinator.dataset, env=env)
    coordinator = coordinator.model_copy(update={"eval_data": data_dir})
    # auto (the default) detects the version of a given broker; a broker simulate starts itself is known.
    mqtt_version: str = connection.mqtt_version
    if args.broker:
        broker = connection.broker.with_credentials(None, None).to_url()
    elif args.embedded or not _mosquitto_available():
        broker = "embedded"
        if mqtt_version == "5":
            raise ConfigError("--mqtt-version", "the embedded broker speaks MQTT 3.1.1 only")
        mqtt_version = "3.1.1"
    else:
        broker = "mosquitto"
        mqtt_version = "5" if mqtt_version == "auto" else mqtt_version
    if coordinator.aggregators and mqtt_version == "3.1.1":
        why = "the embedded broker speaks MQTT 3.1.1 only" if broker == "embedded" else "--mqtt-version is 3.1.1"
        raise ConfigError(
            "--aggregators",
            f"aggregator workers share the updates through MQTT 5 shared subscriptions, and {why}: run with "
            "Mosquitto (installed: drop --embedded) or an MQTT 5 --broker",
        )
    c = coordinator
    return SimulationPlan(
        job=job,
        prefix=c.prefix,
        devices=args.devices,
        rounds=c.rounds,
        devices_per_process=per_process,
        device_processes=len(ranges),
        threads_per_process=max(1, cpu_count // len(ranges)),
        min_updates=min_updates,
        min_devices=min_devices,
        round_timeout=c.round_timeout,
        devices_per_round=per_round,
        dataset=c.dataset,
        data_dir=str(data_dir),
        partition=args.partition,
        model=c.model,
        local_epochs=c.local_epochs,
        batch_size=c.batch_size,
        lr=c.lr,
        uplink=c.uplink,
        seed=c.seed,
        train_seed=args.train_seed,
        out_dir=str(Path(args.out) if args.out else Path("runs") / job),
        broker=broker,
        mqtt_version=mqtt_version,
        coordinator=coordinator,
        timeout=args.timeout,
        username=connection.url.username,
        password=connection.url.password,
        tls_ca=None if connection.tls_ca is None else str(connection.tls_ca),
        aggregators=c.aggregators,
    )


def _int_or_none(value: Any, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(flag, f"must be an integer, got {value!r}") from None


def _mosquitto_available() -> bool:
    import shutil

    return shutil.which("mosquitto") is not None


def broker_settings(plan: SimulationPlan, url: str) -> BrokerSettings:
    """The run's broker (``url``: the one given or started) with the plan's credentials, CA file and protocol."""
    from fedmqtt.mqtt.settings import BrokerSettings

    fields = {"broker": url, "username": plan.username, "password": plan.password, "tls_ca": plan.tls_ca}
    data = {k: v for k, v in fields.items() if v is not None}
    # The password was resolved by plan_simulation: no environment fallback here.
    return BrokerSettings.model_validate({**data, "mqtt_version": plan.mqtt_version}, context={"env": {}})


def _connection_flags(plan: SimulationPlan, url: str) -> list[str]:
    # Never the password: a child's argv is visible to every user (ps, /proc/PID/cmdline). child_environment
    # passes it as $FEDMQTT_PASSWORD.
    return [*broker_settings(plan, url).child_args(), "--job", plan.job, "--prefix", plan.prefix]


def mosquitto_sub_line(connection: BrokerSettings, topics: Topics) -> str:
    """The one ``mosquitto_sub`` command that shows a run's topics as they are published: every JSON message
    of the job, without the binary model and update frames. Never the password: ``$FEDMQTT_PASSWORD`` stands in."""
    import shlex

    url = connection.url
    argv = ["mosquitto_sub", "-h", url.host, "-p", str(url.port)]
    if url.username is not None:
        argv += ["-u", url.username]
    if url.tls:
        argv += ["--cafile", str(connection.tls_ca)] if connection.tls_ca else ["--capath", "/etc/ssl/certs"]
    argv += ["-v", "-t", topics.everything_filter, "-T", topics.model, "-T", topics.delta, "-T", topics.updates_filter]
    line = shlex.join(argv)
    return line + ' -P "$FEDMQTT_PASSWORD"' if url.password is not None else line


def result_lines(report: Mapping[str, Any], json_path: Path, png_path: Path, end: str | None, watch: str) -> list[str]:
    """What simulate prints when the job is over: the outcome, the report, the plot and the topics line."""
    totals = report["totals"]
    accuracy = totals["final_accuracy"]
    outcome = (
        f"job {report['config']['job']} {totals['phase']}: {totals['rounds_completed']} rounds, "
        f"final accuracy {'-' if accuracy is None else format(accuracy, '.4f')}, "
        f"{totals['megabytes']:.2f} MB moved, {totals['wall_seconds']:.0f} s"
    )
    if totals.get("epsilon") is not None:  # the accountant's (epsilon, delta) of the whole run
        outcome += f", client-level DP: ε = {totals['epsilon']:.2f} at δ = {totals['delta']:.1e}"
    return [
        outcome + (f" ({end})" if end else ""),
        f"  report: {json_path}",
        f"  plot:   {png_path}",
        f"  watch the topics during a run (this run's broker has stopped): {watch}",
    ]


def _end_reason(state: Any) -> str | None:
    """The detail of the job's last job_finished or job_stopped event (e.g. the target accuracy reached)."""
    from fedmqtt.schema import EventType

    ends = [e for e in state.recent_events if e.type in (EventType.JOB_FINISHED, EventType.JOB_STOPPED)]
    return ends[-1].detail if ends and ends[-1].detail else None


def fedmqtt_command(python: str = sys.executable) -> list[str]:
    return [python, "-m", "fedmqtt.cli"]


def coordinator_command(plan: SimulationPlan, url: str, config: Path, python: str = sys.executable) -> list[str]:
    """The coordinator runs the job simulate validated (``config``, written by :func:`write_coordinator_config`);
    only the broker flags of the run's broker are added."""
    return [*fedmqtt_command(python), "coordinator", "--config", str(config), *broker_settings(plan, url).child_args()]


def write_coordinator_config(plan: SimulationPlan, out_dir: Path) -> Path:
    """OUT/coordinator.toml: the whole job, without the broker connection (flags) or the password (never)."""
    assert plan.coordinator is not None
    return write_config(plan.coordinator, out_dir / CONFIG_FILE, exclude=tuple(BROKER_FLAGS))


def coordinator_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the coordinator's FEDMQTT_* settings: simulate already folded them into the config file,
    and in the child they would override it (flags > environment > file)."""
    names = {s.env for s in COORDINATOR_SETTINGS if s.name != "password"}
    return {k: v for k, v in env.items() if k not in names}


def device_command(plan: SimulationPlan, url: str, first: int, end: int, python: str = sys.executable) -> list[str]:
    """One device process holding devices ``first .. end-1`` (ids ``dev-0000``...), part i of the data."""
    argv = [*fedmqtt_command(python), "device", *_connection_flags(plan, url)]
    argv += [
        "--id-prefix", DEVICE_ID_PREFIX,
        "--parts", f"{first}:{end}",
        "--dataset", plan.dataset,
        "--data-dir", plan.data_dir,
        "--partition", plan.partition,
        "--num-parts", str(plan.devices),
        "--seed", str(plan.seed),
        "--threads", str(plan.threads_per_process),
        "--exit-on-finish",
    ]  # fmt: skip
    if plan.train_seed is not None:
        argv += ["--train-seed", str(plan.train_seed)]
    return argv


def aggregator_ids(plan: SimulationPlan) -> list[str]:
    return [f"{AGGREGATOR_ID_PREFIX}{k}" for k in range(1, plan.aggregators + 1)]


def aggregator_command(
    plan: SimulationPlan, url: str, worker: str, spool: Path, python: str = sys.executable
) -> list[str]:
    """One aggregator worker (``fedmqtt aggregator``) of the run's job, with the coordinator's update limits and its
    spool in the out directory; it exits when the job ends."""
    assert plan.coordinator is not None
    c = plan.coordinator
    argv = [
        *fedmqtt_command(python),
        "-v",  # its log (OUT/agg-K.log) says what it summed each round
        "aggregator",
        *_connection_flags(plan, url),
        "--id",
        worker,
        "--spool",
        str(spool),
    ]
    argv += ["--max-update-mb", repr(c.max_update_mb)]
    if c.max_update_norm is not None:
        argv += ["--max-update-norm", repr(c.max_update_norm)]
    return argv


def child_environment(base: Mapping[str, str], threads: int) -> dict[str, str]:
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log files as they happen
    # BLAS/OpenMP pools would otherwise start one thread per core in every process.
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    log_path: Path
    process: subprocess.Popen[bytes]
    reported: bool = False

    @property
    def returncode(self) -> int | None:
        return self.process.poll()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (empty log)"


class Supervisor:
    """Starts children in their own process groups and stops them all: SIGTERM, wait, SIGKILL.

    ``stop_all`` runs from ``finally`` blocks and, as a last resort, at interpreter exit.
    """

    def __init__(self, grace_s: float = STOP_GRACE_S) -> None:
        self.children: list[Child] = []
        self.grace_s = grace_s
        atexit.register(self.stop_all)

    def start(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> Child:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                # Its own process group (and session): a terminal's Ctrl-C reaches only simulate, which
                # then stops the children in order; killpg reaches anything a child started.
                start_new_session=True,
            )
        child = Child(name=name, log_path=log_path, process=process)
        self.children.append(child)
        return child

    def running(self) -> list[Child]:
        return [c for c in self.children if c.returncode is None]

    def stop_all(self) -> None:
        alive = self.running()
        for child in alive:
            _signal_group(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in alive:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.process.pid, signal.SIGKILL)
                child.process.wait()

    def close(self) -> None:
        self.stop_all()
        atexit.unregister(self.stop_all)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`SimulationInterrupted` in the main thread while inside."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SimulationInterrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While stopping children, a second Ctrl-C must not cut the clean-up short."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def start_broker(plan: SimulationPlan) -> Iterator[str]:
    """Yield the broker URL: the given one, or a Mosquitto / embedded broker for the run's duration."""
    if plan.broker == "mosquitto":
        import tempfile

        from fedmqtt.broker.mosquitto import MosquittoBroker

        # A throw-away broker: its configuration and persistence go with the run.
        with (
            tempfile.TemporaryDirectory(prefix="fedmqtt-mosquitto-") as config_dir,
            MosquittoBroker(config_dir, port=0) as mosquitto,
        ):
            yield mosquitto.url
    elif plan.broker == "embedded":
        from fedmqtt.broker.embedded import EmbeddedBroker

        with EmbeddedBroker(host="127.0.0.1", port=0) as embedded:
            yield embedded.url
    else:
        yield plan.broker


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


class _Display:
    """The live view on a terminal, plain log lines otherwise."""

    def __init__(self, out: IO[str]) -> None:
        from fedmqtt.watch import Narrator

        self.out = out
        self.is_tty = out.isatty()
        self.started = time.monotonic()
        self._live: Any = None
        self._narrator: Narrator | None = None

    def __enter__(self) -> _Display:
        if self.is_tty:
            console = require("sim", "rich.console", "the live view").Console(file=self.out)
            self._live = require("sim", "rich.live", "the live view").Live(
                console=console, refresh_per_second=4, transient=False
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, state: Any, footer: str) -> None:
        from fedmqtt.watch import Narrator, render

        if self._live is not None:
            Group = require("sim", "rich.console", "the live view").Group
            Text = require("sim", "rich.text", "the live view").Text
            self._live.update(Group(render(state), Text(footer, style="dim")))
            return
        if self._narrator is None:
            self._narrator = Narrator(state.topics)
        for line in self._narrator.lines(state, time.monotonic()):
            self.line(line)

    def line(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        message = f"[{elapsed:6.1f}s] {text}"
        if self._live is not None:
            self._live.console.print(message)
        else:
            print(message, file=self.out, flush=True)


def run_simulation(plan: SimulationPlan, *, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    """Run the whole simulation; return the exit status (0 when the coordinator finished the job).

    When it ends early (Ctrl-C, SIGTERM, a failure) after at least one round closed, the report of the
    rounds so far is still written.
    """
    from fedmqtt.watch import StateHolder, WatchState

    out_dir = Path(plan.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor()
    started = time.monotonic()
    holder = StateHolder(WatchState(topics=Topics(job=plan.job, prefix=plan.prefix)))
    try:
        with _stop_signals_raise():
            return _run(plan, out_dir, supervisor, holder, started, out, err)
    except SimulationInterrupted as exc:
        running = len(supervisor.running())
        print(f"fedmqtt simulate: {exc} received: stopping {running} processes", file=err, flush=True)
        _write_partial_report(plan, out_dir, holder, started, err)
        return 128 + exc.signum
    except FedmqttError:
        _write_partial_report(plan, out_dir, holder, started, err)
        raise
    finally:
        with _signals_ignored():
            supervisor.close()


def _write_partial_report(plan: SimulationPlan, out_dir: Path, holder: Any, started: float, err: IO[str]) -> None:
    from fedmqtt.report import build_report, write_report

    state = holder.state
    if not state.rounds:
        return
    report = build_report(
        plan.report_config(),
        state.ordered_rounds(),
        state.status,
        state.privacy,
        wall_seconds=time.monotonic() - started,
        malformed_messages=state.malformed,
    )
    with _signals_ignored():
        json_path, png_path = write_report(out_dir, report)
    print(f"fedmqtt simulate: report of the {len(state.rounds)} rounds done: {json_path}, {png_path}", file=err)


def _run(
    plan: SimulationPlan,
    out_dir: Path,
    supervisor: Supervisor,
    holder: Any,
    started: float,
    out: IO[str],
    err: IO[str],
) -> int:
    from fedmqtt.report import build_report, write_report
    from fedmqtt.watch import client_settings, collect_snapshot, open_watch, random_client_id

    topics = holder.state.topics
    with start_broker(plan) as url:
        connection = broker_settings(plan, url)
        env = {**child_environment(os.environ, plan.threads_per_process), **connection.child_env()}
        settings = client_settings(connection, client_id=random_client_id("sim"))
        watcher = open_watch(settings, holder)
        # Children stop while the broker still runs, so that devices can say goodbye (offline status).
        try:
            config_path = write_coordinator_config(plan, out_dir)
            coordinator = supervisor.start(
                "coordinator",
                coordinator_command(plan, url, config_path),
                out_dir / "coordinator.log",
                coordinator_environment(env),
            )
            workers = [
                supervisor.start(
                    worker,
                    aggregator_command(plan, url, worker, out_dir / "aggregators" / worker),
                    out_dir / f"{worker}.log",
                    env,
                )
                for worker in aggregator_ids(plan)
            ]
            devices = [
                supervisor.start(f"devices-{k}", device_command(plan, url, a, b), out_dir / f"devices-{k}.log", env)
                for k, (a, b) in enumerate(device_ranges(plan.devices, plan.devices_per_process))
            ]
            watch_line = mosquitto_sub_line(connection, topics)
            with _Display(out) as display:
                scale_out = f", {len(workers)} aggregator workers" if workers else ""
                display.line(
                    f"job {plan.job}: {plan.devices} devices in {len(devices)} processes{scale_out}, {plan.rounds} "
                    f"rounds, broker {plan.broker} ({url}), logs in {out_dir}"
                )
                display.line(f"watch the topics in another terminal: {watch_line}")
                code = _supervise(plan, supervisor, coordinator, devices, holder, display, started, err, workers)
            if code != 0:
                return code
            # The retained messages are the record of the run: read them once more, so that no summary
            # that was in flight when the coordinator exited is missing from the report.
            # (A client id of its own: the broker would otherwise disconnect the live watcher.)
            snapshot_settings = dataclasses.replace(settings, client_id=random_client_id("sim"))
            final = collect_snapshot(snapshot_settings, topics, wait_s=10.0, quiet_s=0.5)
            _wait_for_devices(devices + workers, timeout_s=15.0)
        finally:
            watcher.close()
            with _signals_ignored():
                supervisor.stop_all()
    report = build_report(
        plan.report_config(),
        final.ordered_rounds(),
        final.status,
        final.privacy,
        wall_seconds=time.monotonic() - started,
        malformed_messages=holder.state.malformed,
    )
    json_path, png_path = write_report(out_dir, report)
    end = _end_reason(final) or _end_reason(holder.state)
    print("\n".join(result_lines(report, json_path, png_path, end, watch_line)), file=out, flush=True)
    return 0


def _supervise(
    plan: SimulationPlan,
    supervisor: Supervisor,
    coordinator: Child,
    devices: list[Child],
    holder: Any,
    display: _Display,
    started: float,
    err: IO[str],
    workers: Sequence[Child] = (),
) -> int:
    """Show progress until the coordinator exits; report failing children (devices, aggregator workers) with
    their log tails."""
    while True:
        display.update(holder.state, _footer(supervisor))
        code = coordinator.returncode
        if code is not None:
            display.update(holder.state, _footer(supervisor))
            if code == 0:
                return 0
            print(
                f"fedmqtt simulate: the coordinator exited with status {code}; "
                f"the end of {coordinator.log_path}:\n{log_tail(coordinator.log_path)}",
                file=err,
                flush=True,
            )
            return 1
        for child in [*devices, *workers]:
            if child.returncode is not None and not child.reported:
                child.reported = True
                if child.returncode == 0 and holder.state.finished:
                    continue  # it left because the job ended (aggregator workers exit with the job)
                display.line(
                    f"{child.name} exited with status {child.returncode} before the job finished; "
                    f"the end of {child.log_path}:\n{log_tail(child.log_path)}"
                )
        if all(child.returncode is not None for child in devices):
            with contextlib.suppress(subprocess.TimeoutExpired):
                coordinator.process.wait(timeout=2.0)  # often both fail for one reason: show the coordinator's
            if coordinator.returncode is not None:
                continue
            raise SimulateError(
                "every device process has exited, so the job cannot finish; see the logs in "
                f"{coordinator.log_path.parent}"
            )
        if plan.timeout is not None and time.monotonic() - started > plan.timeout:
            raise SimulateError(
                f"the job did not finish within --timeout {plan.timeout:g} s; the end of "
                f"{coordinator.log_path}:\n{log_tail(coordinator.log_path)}"
            )
        time.sleep(0.25)


def _footer(supervisor: Supervisor) -> str:
    running = supervisor.running()
    return f"{len(running)} of {len(supervisor.children)} processes running (Ctrl-C stops them all)"


def _wait_for_devices(devices: list[Child], timeout_s: float) -> None:
    """Devices run with --exit-on-finish: give them a moment to publish offline and leave."""
    deadline = time.monotonic() + timeout_s
    for child in devices:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def run_simulate_command(args: argparse.Namespace) -> int:
    from fedmqtt.mqtt import max_clients_per_process

    for module in ("rich", "matplotlib"):  # the live view and the report plot: refused now, not after the run
        require("sim", module, "fedmqtt simulate")
    plan = plan_simulation(
        args,
        env=os.environ,
        max_clients_per_process=max_clients_per_process(),  # raises this process's (and its children's) limit
        cpu_count=os.cpu_count() or 1,
        now=time.time(),
    )
    return run_simulation(plan)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="run a whole federated job locally: broker, coordinator and device processes, with a report",
        description="Start a broker (unless --broker), a coordinator and N devices as separate processes, show "
        "the rounds live, and write report.json and report.png into --out.",
    )
    p.add_argument("--devices", type=int, required=True, help="number of devices")
    p.add_argument("--out", help="directory for the report and logs (default: runs/JOB)")
    p.add_argument("--timeout", type=float, help="give up (and stop everything) after this many seconds")
    g = p.add_argument_group("broker")
    g.add_argument(
        "--embedded",
        action="store_true",
        help="start the embedded (amqtt, MQTT 3.1.1) broker even if Mosquitto is installed",
    )
    from fedmqtt.device.cli import add_train_seed_flag
    from fedmqtt.mqtt.settings import add_broker_flags

    add_broker_flags(
        g,
        broker_help="use this broker instead of starting one (default: start Mosquitto if installed, else the "
        "embedded broker; simulate then knows the MQTT version it speaks)",
        client_certificate=False,  # its devices share one process tree: one certificate cannot be each one's
    )
    g = p.add_argument_group("processes")
    g.add_argument(
        "--devices-per-process",
        type=int,
        help="devices packed into one process, each its own MQTT client "
        f"(default: two processes per core, at most {DEFAULT_MAX_DEVICE_PROCESSES})",
    )
    # Every coordinator setting that makes sense here, derived from CoordinatorConfig (same defaults).
    S.add_flags(p, SIMULATE_SETTINGS, default_override=_SIMULATE_DEFAULTS)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir", help="IDX files (default: $FEDMQTT_DATA, else ~/.cache/fedmqtt/DATASET, downloaded if missing)"
    )
    g.add_argument("--partition", default="iid", help="iid, shards:2, dirichlet:0.5 (default: %(default)s)")
    add_train_seed_flag(g)
    p.set_defaults(func=run_simulate_command)
