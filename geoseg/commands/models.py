"""``geoseg models``: list the bundled models and their cards."""

from __future__ import annotations

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the cards as JSON.")
def models(as_json: bool) -> None:
    """List the bundled models (offline, made by geoseg) with their cards."""
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
