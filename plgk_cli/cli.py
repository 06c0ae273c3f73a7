"""The `plgk` command: parses options and calls library functions. Imports torch lazily."""

from __future__ import annotations

import functools
import math
import os
import re
import sys

import click

from plgk_cli import __version__
from plgk_cli.errors import PlgkError
from plgk_cli.signals import ignore as ignore_signals
from plgk_cli.signals import interruptible


INTERRUPTED = {
    "train": "the run directory holds the steps recorded so far: continue with "
             "`plgk train --config ... --out DIR --resume`",
    "replay": "the output file was not written",
}


# an OSError naming a path that no check caught: the code of the command's own files
PATH_ERROR_CODES = {"train": 14, "replay": 14, "check": 12, "inspect": 15}

LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines splits on


def one_line(message: str) -> str:
    """Keep the one-line contract when a name the user gave (a path, a key) holds a line break."""
    return LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], message)


def reports_errors(fn):
    """Turn a PlgkError into one line on stderr and its exit code; --debug keeps the traceback.
    SIGINT and SIGTERM stop the command (signals.py) with the INTERRUPTED line and 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            with interruptible():
                return fn(*args, **kwargs)
        except PlgkError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            ignore_signals()  # the line is printed whole, whatever arrives now
            click.echo(f"plgk: error: {one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            ignore_signals()
            click.echo(interrupted_line(ctx.info_name, ctx.params), err=True)
            sys.exit(130)
        except OSError as exc:  # a path the system refuses (a name too long, a loop of links)
            if exc.filename is None or ctx.find_root().params.get("debug"):
                raise
            ignore_signals()
            click.echo(f"plgk: error: {one_line(str(exc.filename))}: {exc.strerror}; give another path", err=True)
            sys.exit(PATH_ERROR_CODES.get(ctx.info_name, 14))
        finally:  # a command that failed before choosing threads leaves no request behind
            from plgk_cli.threads import request_default

            request_default(False)

    return wrapper


def interrupted_line(command: str | None, params: dict | None = None) -> str:
    params = params or {}
    if command == "train" and params.get("out") is not None and (
            params.get("overwrite") or not os.path.isfile(os.path.join(params["out"], "manifest.json"))):
        # stopped before the Recorder began (loading the data, building the model); an interrupted
        # --overwrite after that is train's own Interrupted error
        return "plgk: interrupted; nothing was recorded, --out is as it was"
    return f"plgk: interrupted; {INTERRUPTED.get(command, 'stopped')}"


class PlgkGroup(click.Group):
    """A signal that lands outside a command's own handling (while click parses, or as the
    command's error line is printed) still ends with the interrupted line and 130, never
    click's "Aborted!" and 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            ignore_signals()
            click.echo(interrupted_line(ctx.invoked_subcommand), err=True)
            sys.exit(130)


def set_threads(threads: int | None, error: type) -> None:
    """--threads: torch's CPU threads. Without it the train or replay call picks the count from the
    model's size and the machine's free CPUs once it has built the model (plgk_cli/threads.py)."""
    from plgk_cli.threads import request_default

    request_default(threads is None)
    if threads is None:
        return
    cpus = os.cpu_count() or 1
    if not 1 <= threads <= cpus:  # more threads than CPUs only slows down; OpenMP crashes on 100000
        raise error(f"--threads: must be >= 1 and at most the {cpus} CPUs of this machine, got {threads}")
    import torch

    torch.set_num_threads(threads)


THREADS_HELP = ("CPU threads for torch (default on CPU: one per 100k model parameters, at most the CPUs "
                "the load average leaves free, at least 1; OMP_NUM_THREADS or MKL_NUM_THREADS, if set, "
                "decide instead).")


@click.group(cls=PlgkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="plgk")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug):
    """Make a training run auditable: record it, replay it, inspect the audit."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML run configuration (see configs/).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run directory to create (must be new or empty, unless --overwrite or --resume).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run in --out (only a plgk run directory; only once the new run is complete).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Record a step whose loss, gradients or parameters are NaN or Inf (and mark the run) "
                   "instead of stopping there.")
@click.option("--threads", default=None, type=int, help=THREADS_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def train(config_path, out, overwrite, resume, allow_nonfinite, threads, quiet):
    """Train a model and record its trajectory."""
    from plgk_cli.config import load_config
    from plgk_cli.errors import ConfigError
    from plgk_cli.train import check_out_dir, train as run_training

    set_threads(threads, ConfigError)
    # before the config is read: fail fast
    check_out_dir(out, resume=resume, overwrite=overwrite, inputs={"--config": config_path})

    manifest = run_training(load_config(config_path), out, progress=not quiet, resume=resume,
                            overwrite=overwrite, allow_nonfinite=allow_nonfinite)
    final = manifest["final"]
    accuracy, test_loss = final["test_accuracy"], final["test_loss"]
    test = f"test loss {test_loss:.4f}" if test_loss == test_loss else "no test split"
    click.echo(f"recorded {manifest['total_steps']} steps to {out}: train loss "
               f"{final['train_loss']:.4f}, {test}"
               + ("" if accuracy != accuracy else f", test accuracy {accuracy:.4f}"))


@main.command()
@click.option("--ckpts", required=True, help="Run directory written by `plgk train`.")
@click.option("--audit-set", required=True,
              help="SPLIT[START:STOP] over train/test (e.g. test[:64]), PATH.npz with arrays x, y, or "
                   "(language models) PATH.jsonl of {\"prompt\", \"continuation\"} lines.")
@click.option("--out", default="influences.h5", show_default=True, help="Output HDF5 file.")
@click.option("--target", "targets", multiple=True, default=("loss",), show_default=True,
              help="loss | logit | margin | logits (classification), loss | output (regression), loss | "
                   "sequence-logprob | token-losses (language models); repeat for several.")
@click.option("--rule", default="trapezoid", show_default=True,
              help="Quadrature over each update: euler | trapezoid | supersample:K | adaptive[:TOL].")
@click.option("--train-subset", default=None, help="Partial audit: START:STOP or a file of indices.")
@click.option("--group-by", type=click.Choice(["label"]), default=None,
              help="Grouped audit: influence per training class.")
@click.option("--stride", default=1, show_default=True, type=int,
              help="Evaluate the audit side every K updates only (faster, coarser).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--chunk-size", default=256, show_default=True, type=int,
              help="Examples per batched per-sample-gradient pass.")
@click.option("--memory-budget", default=0.0, show_default=True, type=float,
              help="MB for the replay's tensors; picks the chunk size (0: use --chunk-size).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (and its progress).")
@click.option("--resume", is_flag=True, help="Continue an interrupted replay from its last commit.")
@click.option("--commit-every", default=0, show_default=True, type=int,
              help="Commit progress every K updates (0: by time only).")
@click.option("--commit-seconds", default=60.0, show_default=True, type=float,
              help="Commit progress at least this often.")
@click.option("--kernel", is_flag=True, help="Also the PLGK, IPS, temporal kernel and regime metrics.")
@click.option("--kernel-stride", default=0, show_default=True, type=int,
              help="Updates between kernel checkpoints (0: one epoch).")
@click.option("--kernel-train", is_flag=True, help="Also the train x train PLGK (M x M).")
@click.option("--precondition", is_flag=True,
              help="Weigh the PLGK by the optimizer's preconditioner (paper eq. 29).")
@click.option("--modes", default="0", show_default=True, metavar="K|auto[:ENERGY]",
              help="K training-gradient modes (Algorithm 1), or auto: grow K until the modes hold ENERGY "
                   "of the gradients' energy (default 0.99); 0: none.")
@click.option("--modes-at", multiple=True, type=int, help="Reference step of the modes (repeatable; "
              "default: the final checkpoint).")
@click.option("--modes-method", default="svd", show_default=True, type=click.Choice(["svd", "oja"]))
@click.option("--save-modes", is_flag=True, help="Store the modes' parameter-space vectors V (P x K).")
@click.option("--ghost", is_flag=True, help="Plain SGD, euler: credit Linear layers by ghost dot "
              "products, without their per-example gradients (paper A.2.8).")
@click.option("--accept-update-error", "--max-update-error", "max_update_error", default=None, type=float,
              help="The update check's gate: stop where a re-derived update differs from the recorded "
                   "one by more (relative; default 1e-3 for float32 runs, 1e-8 for float64); a larger "
                   "value given here is recorded in the output (accepted_update_error).")
@click.option("--shard", default="auto", show_default=True, type=click.Choice(["auto", "rows", "audit"]),
              help="Under torchrun: rows also splits each minibatch's per-example gradients over the ranks, "
                   "audit only the audit points; auto times both on the run (the result is the same).")
@click.option("--threads", default=None, type=int, help=THREADS_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def replay(ckpts, audit_set, out, targets, rule, train_subset, group_by, stride, device, chunk_size,
           memory_budget, overwrite, resume, commit_every, commit_seconds, kernel, kernel_stride, kernel_train,
           precondition, modes, modes_at, modes_method, save_modes, ghost, max_update_error, shard, threads, quiet):
    """Replay a recorded run and write the training-data audit."""
    from plgk_cli.arguments import ReplayArguments
    from plgk_cli.errors import AuditSpecError
    from plgk_cli.replay import replay as run_replay

    set_threads(threads, AuditSpecError)

    targets = tuple(t.strip() for spec in targets for t in spec.split(",") if t.strip())
    args = ReplayArguments(ckpts=ckpts, audit_set=audit_set, out=out, targets=targets, rule=rule,
                           train_subset=train_subset, group_by=group_by, stride=stride,
                           device=device, chunk_size=chunk_size, memory_budget=memory_budget,
                           overwrite=overwrite, resume=resume,
                           commit_every=commit_every, commit_seconds=commit_seconds, kernel=kernel,
                           kernel_stride=kernel_stride, kernel_train=kernel_train,
                           precondition=precondition, modes=modes, modes_at=tuple(modes_at),
                           modes_method=modes_method, save_modes=save_modes, ghost=ghost,
                           max_update_error=max_update_error, shard=shard)
    result = run_replay(args, progress=not quiet)
    if result.rank != 0:
        return
    for target, m in result.metrics.items():
        caveat = "  (partial audit: MRE is not a completeness measure)" if train_subset else ""
        # LC is a correlation over audit points: none for one point, or for changes all equal
        lc = f"{m['lc']:.6f}" if math.isfinite(m["lc"]) else "n/a (needs 2 audit points whose changes differ)"
        click.echo(f"{target}: MRE {m['mre']:.3e}  LC {lc}{caveat}")
    if result.sharding:
        click.echo(result.sharding)
    drift = "" if result.max_drift is None else f"; re-simulation drift {result.max_drift:.2e}"
    click.echo(f"worst update error {result.max_update_error:.2e} over {result.steps} steps{drift}; "
               f"wrote {out}")
    for line in result.warnings:
        click.echo(f"plgk: warning: {line}", err=True)


@main.command()
@click.argument("run_dir")
@reports_errors
def check(run_dir):
    """Validate a run directory and report every problem found."""
    from plgk_cli.check import validate_run

    problems = validate_run(run_dir)
    for p in problems:
        click.echo(f"plgk: problem: {one_line(p.message)}", err=True)
    if problems:
        click.echo(f"{one_line(run_dir)}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", err=True)
        sys.exit(max(p.error.exit_code for p in problems))
    click.echo(f"{run_dir}: ok")


@main.command()
@click.argument("path")
@click.option("--audit", type=int, default=None, help="Audit point to list examples for.")
@click.option("--top", type=int, default=10, show_default=True, help="How many examples each way.")
@click.option("--target", default=None, help="Target to list (default: the first stored).")
@click.option("--class", "klass", type=int, default=None, help="Class column for --target logits.")
@click.option("--kernel", "show_kernel", is_flag=True,
              help="Kernel geometry, modes and the difficulty-score table (replay --kernel).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plot", "plot_dir", default=None, type=click.Path(),
              help="Also write PNG pictures into this directory (for --audit, default 0); "
                   "needs matplotlib: pip install 'plgk[plot]'.")
@reports_errors
def inspect(path, audit, top, target, klass, show_kernel, as_json, plot_dir):
    """Summarise an influences.h5, or list the top training examples of one audit point."""
    from plgk_cli.inspect import (check_options, format_kernel, format_summary, format_top, kernel_summary,
                                  summary, to_json, top_examples)
    from plgk_cli.store import InfluenceFile

    with InfluenceFile(path) as f:
        check_options(f, audit, top, target, klass, plot_dir is not None)
        if show_kernel:
            result, text = kernel_summary(f), format_kernel
        elif audit is None:
            result, text = summary(f), format_summary
        else:
            result, text = top_examples(f, audit, top, target, klass), format_top
        if plot_dir is not None:
            from plgk_cli.plots import write_plots

            plots = write_plots(f, plot_dir, audit or 0, target, klass)
    if as_json:
        if plot_dir is not None:
            result = {**result, "plots": {"written": [str(p) for p in plots.written],
                                          "skipped": [{"file": n, "why": w} for n, w in plots.skipped]}}
        click.echo(to_json(result))
        return
    click.echo(text(result))
    if plot_dir is not None:
        click.echo(f"wrote {len(plots.written)} pictures to {plot_dir}: "
                   + ", ".join(p.name for p in plots.written))
        for name, why in plots.skipped:
            click.echo(f"skipped {name}: {why}")


def entry() -> None:
    """The `plgk` console script and `python -m plgk_cli`: main(), except that a command stopped by
    a signal exits right after its line, skipping the interpreter's teardown (torch's alone takes
    about half a second), so that the signal is honoured within one."""
    try:
        os.getcwd()
    except FileNotFoundError:  # torch cannot even be imported from a deleted directory
        click.echo("plgk: error: the working directory no longer exists; cd to one that does", err=True)
        sys.exit(14)
    try:
        main()
    except SystemExit as exc:
        if exc.code == 130:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        raise


if __name__ == "__main__":
    entry()
