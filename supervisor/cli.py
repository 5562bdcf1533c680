"""``launch.py``: the command users type.

``python launch.py [launcher flags] [SCRIPT [SCRIPT ARGS...]]`` supervises SCRIPT (default: the
built-in trainer) under torchrun; ``python launch.py status RUN_DIR`` shows a run's state.
Bad input gives one line and exit code 2 before anything is launched.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import filelock

from runcontract import exit_codes, layout
from runcontract.cli import Parser, UsageError, add_flag, flag_fields, flag_names
from runcontract.events import EventType
from supervisor import flag_groups, slurm
from supervisor.config import BUILTIN_TRAINER, LaunchConfig
from supervisor.events import EventLog, RunDirUnwritable, read_events
from supervisor.heartbeat import HangConfig
from supervisor.loop import Supervisor
from supervisor.policy import PolicyConfig
from supervisor.proctree import set_child_subreaper
from supervisor.runner import TorchrunRunner
from supervisor.status import format_status, read_node_states, read_state
from trainer.supervised import pid_alive, read_owner, write_owner

PROG = "launch.py"


def build_parser() -> argparse.ArgumentParser:
    """The launcher's flags: one per configuration field made with ``option`` (its default and
    help text are the field's), plus the few that fill no field one to one."""
    p = Parser(
        prog=PROG,
        description="Run a torchrun script under a supervisor that restarts it from the newest "
        "valid checkpoint after crashes and hangs.",
        usage=f"{PROG} [flags] [SCRIPT [SCRIPT ARGS...] | -- TRAINER ARGS...]  |  "
        f"{PROG} status RUN_DIR  |  {PROG} chaos RUN_DIR [...]  |  {PROG} report RUN_DIR",
    )
    groups = {name: p.add_argument_group(name) for name in flag_groups.ORDER}
    for cls in (LaunchConfig, PolicyConfig, HangConfig):
        for f, hint in flag_fields(cls):
            add_flag(groups[f.metadata["group"]], f, hint)
    workers, detection = groups[flag_groups.WORKERS], groups[flag_groups.DETECTION]
    workers.add_argument(
        "--force-nproc",
        action="store_true",
        help="launch --nproc workers even beyond this node's GPUs (or 4 x its CPU cores "
        "without GPUs)",
    )
    workers.add_argument(
        "--run-dir", default=None, help="run directory (default runs/run-YYYYmmdd-HHMMSS)"
    )
    detection.add_argument(
        "--require-heartbeats",
        choices=("auto", "yes", "no"),
        default="auto",
        help="treat a worker with no heartbeat after --startup-timeout as hung "
        "(auto: yes for the built-in trainer, no for other scripts)",
    )
    detection.add_argument(
        "--chaos",
        metavar="SPEC",
        default=None,
        help="run the chaos tool alongside the job, e.g. kill-worker:every=30:count=3 "
        "(see docs/chaos.md)",
    )
    p.add_argument(
        "script",
        nargs="?",
        default=None,
        help="the torchrun script (default: the built-in trainer)",
    )
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def _fields_of(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values the flags gave for ``cls``'s flag fields."""
    return {f.name: getattr(args, f.name) for f, _ in flag_fields(cls)}


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """Turn parsed flags into a validated configuration. Raises UsageError with one line."""
    script_args = list(args.script_args)
    if args.script is not None and args.script.startswith("-"):
        # `launch.py [flags] -- --steps 100`: flags for the built-in trainer.
        script_args = [args.script, *script_args]
        args.script = None
    if args.script is None:
        script = BUILTIN_TRAINER
        check_trainer_flags(script_args)
    else:
        script = Path(args.script)
        if not script.is_file():
            raise UsageError(f"script {args.script!r} not found (or not a file)")
    if args.slurm:
        _apply_slurm(args)
    run_dir = Path(args.run_dir or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    require = args.require_heartbeats
    require_heartbeats = script == BUILTIN_TRAINER if require == "auto" else require == "yes"
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts {args.max_restarts}: must be >= 0")
    if not args.force_nproc:
        check_nproc(args.nproc)
    try:
        # Backoff jitter: up to one initial backoff, so restarts of several nodes spread out.
        policy = PolicyConfig(**_fields_of(PolicyConfig, args), backoff_jitter=args.backoff_initial)
        hang = HangConfig(**_fields_of(HangConfig, args), require_heartbeats=require_heartbeats)
        config = LaunchConfig(
            script=script.absolute(),
            run_dir=run_dir,
            script_args=tuple(script_args),
            policy=policy,
            hang=hang,
            **_fields_of(LaunchConfig, args),
        )
    except ValueError as e:
        raise UsageError(flag_names(str(e))) from None
    return config


class HelpShown(Exception):
    """The built-in trainer's --help was asked for and printed: nothing is to be launched."""


def check_trainer_flags(script_args: Sequence[str]) -> None:
    """Parse the built-in trainer's flags here, before anything is launched: a typo gets one
    line and exit 2 at once, not a torchrun start and a worker's exit. ``--help`` prints the
    trainer's help (raises HelpShown). The trainer's parser imports no torch."""
    from trainer.config import ConfigError, parse_args

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            parse_args(list(script_args), prog=f"{PROG} --")
    except ConfigError as e:
        raise UsageError(f"trainer flag {e}") from None
    except SystemExit as e:  # argparse: --help printed (0), or a bad flag (2)
        if e.code in (0, None):
            raise HelpShown() from None
        message = said.getvalue().strip().removeprefix(f"{PROG} --: error: ")
        raise UsageError(f"trainer flags: {message}") from None


def visible_gpus() -> int:
    """GPUs this node shows to its workers, found without importing torch: the NVIDIA driver's
    list, narrowed by CUDA_VISIBLE_DEVICES when that is set."""
    try:
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        count = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and count:
        count = min(count, len([d for d in visible.split(",") if d.strip() not in ("", "-1")]))
    return count


def check_nproc(nproc: int) -> None:
    """Refuse more workers than this node can run: one per GPU, or 4 per CPU core without
    GPUs (``--force-nproc`` skips the check)."""
    gpus = visible_gpus()
    cores = os.cpu_count() or 1
    limit, what = (gpus, f"{gpus} visible GPU(s)") if gpus else (4 * cores, f"{cores} CPU cores")
    if nproc > limit:
        raise UsageError(
            f"--nproc {nproc}: this node has {what}, room for at most {limit} worker(s); "
            "use --force-nproc to launch them anyway"
        )


def _apply_slurm(args: argparse.Namespace) -> None:
    """Fill the multi-node flags the user left out from SLURM's environment."""
    try:
        alloc = slurm.from_env()
    except slurm.SlurmError as e:
        raise UsageError(str(e)) from None
    if args.nnodes == "1" and alloc.nnodes > 1:
        args.nnodes = str(alloc.nnodes)
    if args.node_rank is None:
        args.node_rank = alloc.node_rank
    if args.rdzv_endpoint is None:
        args.rdzv_endpoint = alloc.rdzv_endpoint()
    if args.rdzv_id is None:
        args.rdzv_id = alloc.job_id
    if args.run_dir is None:
        args.run_dir = f"runs/slurm-{alloc.job_id}"


def prepare_run_dir(config: LaunchConfig) -> None:
    """Create the run directory, prove it writable, and check that what the run will write
    there can be written: a directory where a file must go (or the reverse) is found now, with
    one line and exit 2, not as a traceback mid-run. Raises UsageError."""
    run_dir = config.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".probe-"):
            pass
    except OSError as e:
        raise UsageError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None
    files = (config.events_file, config.state_file, config.lock_file, config.lock_owner_file)
    dirs = (
        config.heartbeat_dir,
        config.log_root,
        run_dir / layout.CHECKPOINTS,
        run_dir / layout.CHECKPOINTS / layout.QUARANTINE,
    )
    for path in files:
        if path.is_dir():
            raise UsageError(f"{path} is a directory; the supervisor writes a file there")
    for path in dirs:
        if os.path.lexists(path) and not path.is_dir():
            raise UsageError(f"{path} is not a directory; move it away")


def _lock_holder(config: LaunchConfig) -> str:
    """ " (pid N)" of the supervisor that holds this node's lock, from the owner file it wrote
    when it took the lock; "" when that is unknown or names a process that is gone."""
    owner = read_owner(config.lock_owner_file)
    return f" (pid {owner[0]})" if owner is not None and pid_alive(owner[0]) else ""


def _previous_attempt(config: LaunchConfig) -> int:
    """The last attempt number an earlier supervisor of this node used (0 when none)."""
    try:
        previous = int(read_state(config.run_dir, config.state_file).get("attempt") or 0)
    except (OSError, ValueError, TypeError):
        previous = 0
    logs = config.log_root
    numbers = [int(p.name[8:]) for p in logs.glob("attempt-*") if p.name[8:].isdigit()]
    return max([previous, *numbers])


def _previous_restarts(config: LaunchConfig) -> int:
    """Restarts an earlier supervisor of this node spent (0 when none): the budget is the
    run's, not one process's, so a relaunch or a SLURM requeue does not refill it. A corrupt
    ``supervisor.json`` does not refill it either: the count is rebuilt from the events."""
    try:
        return max(0, int(read_state(config.run_dir, config.state_file).get("restarts_used") or 0))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, TypeError) as e:
        used = restarts_from_events(config.events_file)
        print(
            f"{PROG}: warning: {config.state_file.name} is unreadable ({e}); "
            f"{used} restart(s) already used, counted from {config.events_file.name}",
            file=sys.stderr,
        )
        return used


def restarts_from_events(path: Path) -> int:
    """The restarts used so far, as the events record them: the newest count any event gives
    (``supervisor_started`` carries the count it started with, ``backoff`` and the final
    events the count after each failure). Raises UsageError when the events cannot be read
    either: the budget is then unknown, and refilling it is not the answer."""
    try:
        events = read_events(path)
    except OSError as e:
        raise UsageError(
            f"the restart count is lost: neither the state file nor {path} can be read ({e}); "
            "repair one of them, or start a new --run-dir"
        ) from None
    used = 0
    for event in events:
        value = event.get("restarts_used", event.get("restarts_carried"))
        if isinstance(value, int) and value >= 0:
            used = value
    return used


def run(argv: Sequence[str]) -> int:
    """Supervise a script; returns the exit code (see ``runcontract.exit_codes``)."""
    args = build_parser().parse_args(list(argv))
    config = config_from_args(args)
    if args.chaos is not None:
        from tools import chaos

        try:
            chaos.parse_spec(args.chaos, config.run_dir, config.node_tag or None)
        except ValueError as e:
            raise UsageError(str(e)) from None
    prepare_run_dir(config)
    lock = filelock.FileLock(str(config.lock_file))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(
            f"{PROG}: error: run directory {config.run_dir} is owned by another supervisor"
            f"{' of ' + config.node_tag if config.node_tag else ''}{_lock_holder(config)}; "
            "stop it, or choose another --run-dir",
            file=sys.stderr,
        )
        return exit_codes.RUN_DIR_LOCKED
    try:
        write_owner(config.lock_owner_file)
        set_child_subreaper()
        try:
            events = EventLog(config.events_file)
        except OSError as e:
            raise UsageError(f"cannot write {config.events_file}: {e.strerror or e}") from None
        try:
            code = _supervise(config, events, args.chaos)
        finally:
            events.close()
        if code != exit_codes.RUN_DIR_UNWRITABLE:
            _write_text_report(config.run_dir, config.node_tag or None)
        return code
    finally:
        lock.release()


def _supervise(config: LaunchConfig, events: EventLog, chaos_spec: str | None) -> int:
    """Run the supervisor (and the chaos tool beside it, when asked) until the run ends; the
    workers never outlive it, whatever goes wrong. Returns the exit code."""
    runner = TorchrunRunner(config)
    supervisor = Supervisor(
        config,
        runner,
        events,
        first_attempt=_previous_attempt(config) + 1,
        restarts_carried=_previous_restarts(config),
    )
    restore = _install_signal_handlers(supervisor.request_stop)
    injector = None
    try:
        if chaos_spec is not None:
            from tools import chaos

            # Its own process, as a real fault arrives from outside the supervisor.
            injector = chaos.spawn(config.run_dir, chaos_spec, config.node_tag or None)
        code = supervisor.run()
    except RunDirUnwritable as e:  # the workers must not outlive the supervisor's story
        if runner.tree is not None:
            runner.stop(config.stop_grace)
        print(f"{PROG}: error: {e}; the workers were stopped", file=sys.stderr)
        return exit_codes.RUN_DIR_UNWRITABLE
    except Exception as e:  # a bug in the supervisor must not leave the workers running
        if runner.tree is not None:
            runner.stop(0.0)
        with contextlib.suppress(OSError, ValueError, RunDirUnwritable):
            events.emit(EventType.INTERNAL_ERROR, error=repr(e), attempt=supervisor.attempt)
        raise
    finally:
        runner.close()  # the standby, if one waits
        if injector is not None:
            from tools import chaos

            chaos.stop_spawned(injector)
        restore()
    print(
        f"{PROG}: {supervisor.exit_reason or exit_codes.describe(code)} (exit {code}); "
        f"run dir {config.run_dir}",
        file=sys.stderr,
    )
    return code


def _install_signal_handlers(callback: Callable[[int], None]) -> Callable[[], None]:
    previous = {}
    # SIGUSR1: SLURM's pre-timeout signal (sbatch --signal=USR1@T); SIGHUP: the terminal went
    # away. Both are handled like SIGTERM.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda signum, _frame: callback(signum))

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def status(argv: Sequence[str]) -> int:
    """``launch.py status RUN_DIR [--json]``: print the run's state; exit 2 when there is none."""
    p = Parser(prog=f"{PROG} status", description="Show a supervised run's state.")
    p.add_argument("run_dir")
    p.add_argument(
        "--json",
        action="store_true",
        help="print supervisor.json as it is (several nodes: an object by node)",
    )
    args = p.parse_args(list(argv))
    run_dir = Path(args.run_dir).absolute()
    try:
        states = read_node_states(run_dir)
    except FileNotFoundError:
        raise UsageError(
            f"{run_dir} has no supervisor.json: not a supervised run directory"
        ) from None
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.json:
        import json

        shown = states[""] if list(states) == [""] else states
        print(json.dumps(shown, indent=2, sort_keys=True))
    else:
        print("\n\n".join(format_status(run_dir, state) for state in states.values()))
    return exit_codes.SUCCESS


def _write_text_report(run_dir: Path, node: str | None = None) -> None:
    """Leave ``RUN_DIR/report.txt`` (a node's ``report-<tag>.txt`` on several nodes) behind and
    say where; the plot is rendered on request only, since matplotlib costs seconds that every
    run would pay."""
    from tools import report

    path = run_dir / layout.per_node_name(layout.REPORT, node)
    try:
        text = report.render_text(report.build_report(run_dir, node))
        path.write_text(text + "\n", encoding="utf-8")
    except (report.ReportError, OSError) as e:
        print(f"{PROG}: no run report: {e}", file=sys.stderr)
        return
    node_flag = f" --node {node}" if node else ""
    print(
        f"{PROG}: report {path} (with the plot: {PROG} report {run_dir}{node_flag})",
        file=sys.stderr,
    )


def report_command(argv: Sequence[str]) -> int:
    """``launch.py report RUN_DIR [...]``: the run report (``tools.report``)."""
    from tools import report

    return report.main(list(argv), prog=f"{PROG} report")


def chaos_command(argv: Sequence[str]) -> int:
    """``launch.py chaos RUN_DIR [...]``: the chaos tool (``tools.chaos``)."""
    from tools import chaos

    return chaos.main(list(argv), prog=f"{PROG} chaos")


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "status": status,
    "chaos": chaos_command,
    "report": report_command,
}
"""Subcommands taken from the first argument; anything else is a script to supervise."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``launch.py``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        return run(argv)
    except HelpShown:
        return exit_codes.SUCCESS
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
