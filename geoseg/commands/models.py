"""``geoseg models``: list the bundled models and their cards; ``models pull`` / ``models zoo``: models by name."""

from __future__ import annotations

import click


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the cards as JSON.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the bundled models (offline, made by geoseg) with their cards; `pull` and `zoo` for public models."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from geoseg.errors import ModelError
    from geoseg.models.bundled import BUNDLED, bundled_card

    cards = {}
    for name in BUNDLED:
        try:
            cards[name] = bundled_card(name)
        except ModelError as exc:
            cards[name] = {"unavailable": str(exc)}
    if as_json:
        click.echo(json.dumps(cards, indent=2))
        return
    for name, c in cards.items():
        if "unavailable" in c:
            click.echo(f"{name}: {c['unavailable']}")
            continue
        classes = ", ".join(x["name"] for x in c["classes"])
        click.echo(f"{name} (v{c['version']}, {c['task']}): {c['description']}")
        click.echo(f"    bands: {', '.join(c['bands'])}; classes: {classes}; licence: {c['license']}")


@models.command()
@click.argument("model")
@click.option("--sha256", "sha256", default=None, metavar="HEX", help="Expected SHA-256 of the file [the catalogue's].")
@click.option("--name", default=None, help="Name to pull it under [the catalogue name, or the URL's file stem].")
@click.option("--force", is_flag=True, help="Download again even when a checked copy is cached.")
@click.pass_context
def pull(ctx: click.Context, model: str, sha256: str | None, name: str | None, force: bool) -> None:
    """Download MODEL (a catalogue name, see `geoseg models zoo`, or an https:// URL of an .onnx file) once into the
    cache ($GEOSEG_CACHE/models), checked; then --model NAME runs it offline. Plain http:// only with --sha256.
    """
    from geoseg.io.remote import redact
    from geoseg.models.zoo import pull as pull_model

    done = pull_model(model, sha256, name=name, force=force)
    if ctx.obj and ctx.obj.get("quiet"):
        return
    if not done.downloaded:
        click.echo(f"{done.name} is already pulled (sha256 {done.sha256}): {done.path}")
        return
    click.echo(f"pulled {done.name} ({done.size / 1e6:.1f} MB, sha256 {done.sha256}) into {done.path}")
    if done.first_use:
        click.echo(
            f"no checksum is known for {redact(model)}: recorded this first download's (trust on first use); later uses "
            "are checked against it (give --sha256 HEX to check a published one)"
        )
    click.echo(f"use it with --model {done.name}")


@models.command()
def zoo() -> None:
    """List the catalogue of public models `geoseg models pull NAME` knows (GEOSEG_ZOO names another catalogue)."""
    from geoseg.models.zoo import load_catalogue

    for name, e in load_catalogue().items():
        state = "pulled" if _pulled(name) else "not pulled"
        if e.refusal():
            state = f"{e.task}{f' ({e.det_type})' if e.det_type else ''}: listed only"  # pull refuses it, saying why
        elif e.task != "segmentation":
            state = f"{e.task}, {state}"
        size = f", {e.resolution_cm:g} cm/px" if e.resolution_cm else ""
        click.echo(f"{name} [{state}]: {e.description}")
        click.echo(f"    classes: {', '.join(e.classes) or '?'}{size}; licence: {e.licence or '?'}; source: {e.source or '?'}")


def _pulled(name: str) -> bool:
    from geoseg.errors import ModelError
    from geoseg.models.zoo import cached_model

    try:
        return cached_model(name) is not None
    except ModelError:
        return False
