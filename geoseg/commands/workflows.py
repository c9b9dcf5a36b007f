"""``geoseg run``, ``geoseg schedule`` and ``geoseg runs``: a workflow file run once, on its schedule, and its ledger."""

from __future__ import annotations

import os

import click

from geoseg.commands.options import workflow_argument, workflow_out_option


@click.command("run")
@workflow_argument
@workflow_out_option
@click.pass_context
def run_cmd(ctx: click.Context, workflow: str, out_dir: str | None) -> None:
    """Run the workflow file WORKFLOW: every model, masks, polygons, a summary and a quicklook PNG."""
    from geoseg.workflows.run import run_workflow
    from geoseg.workflows.summary import format_summary

    quiet = ctx.obj["quiet"]
    summary = run_workflow(workflow, out_dir, echo=None if quiet else click.echo, progress=not quiet)
    if not quiet:
        click.echo(format_summary(summary))


@click.command("schedule")
@workflow_argument
@workflow_out_option
@click.option("--max-runs", type=click.IntRange(min=1), default=None, help="Stop after this many runs [run until Ctrl-C].")
@click.pass_context
def schedule_cmd(ctx: click.Context, workflow: str, out_dir: str | None, max_runs: int | None) -> None:
    """Run WORKFLOW on its cron 'schedule:' (UTC), one run at a time, logging each to schedule.log."""
    from geoseg.workflows.schedule import schedule

    schedule(workflow, out_dir, max_runs=max_runs, echo=None if ctx.obj["quiet"] else click.echo)


@click.command("runs")
@workflow_argument
@workflow_out_option
@click.option("--json", "as_json", is_flag=True, help="Print the ledger as JSON.")
def runs_cmd(workflow: str, out_dir: str | None, as_json: bool) -> None:
    """Print the run ledger of WORKFLOW: every unit of work, its status and timing, and every run."""
    import json

    from geoseg.errors import InputError
    from geoseg.workflows.ledger import LEDGER_NAME, Ledger
    from geoseg.workflows.spec import load_workflow

    wf = load_workflow(workflow, out=out_dir)
    folder = os.path.abspath(out_dir) if out_dir else wf.outputs.folder
    if not os.path.exists(os.path.join(folder, LEDGER_NAME)):
        raise InputError(f"{folder}: no {LEDGER_NAME}: the workflow has not run into this folder yet (geoseg run {workflow})")
    ledger = Ledger(folder)
    units, runs = ledger.units(), ledger.runs()
    ledger.close()
    if as_json:
        click.echo(json.dumps({"units": units, "runs": runs}, indent=2))
        return
    click.echo(f"{'unit':<44} {'kind':<8} {'status':<12} {'run':>4} {'seconds':>8}  finished")
    for u in units:
        secs = "-" if u["seconds"] is None else f"{u['seconds']:.1f}"
        click.echo(f"{u['id']:<44} {u['kind']:<8} {u['status']:<12} {u['run'] or '-':>4} {secs:>8}  {u['finished'] or '-'}")
        if u["error"]:
            click.echo(f"    error: {u['error']}")
    for r in runs:
        click.echo(
            f"run {r['run']}: {r['started']} -> {r['finished'] or '-'} {r['status']}: "
            f"{r['done']} done, {r['skipped']} skipped, {r['failed']} failed"
        )
