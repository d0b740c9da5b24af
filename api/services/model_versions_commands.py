"""`d3 models add|list|activate`: the model versions the service switches between, from the command line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from api.config import load_settings
from api.exceptions import ServiceError
from api.services.model_versions import ModelVersions, parse_card


@contextmanager
def _versions() -> Iterator[ModelVersions]:
    from api.database import Database, SchemaNotMigrated
    from api.storage import StoreError, make_object_store

    settings = load_settings()
    db = Database(settings.resolved_database_url, settings.db_timeout_s)
    try:
        try:
            db.require_migrated()
            store = make_object_store(settings, b"unused: no links are signed here")
            store.ensure_buckets()
        except (ServiceError, SchemaNotMigrated, StoreError) as exc:
            raise click.ClickException(str(getattr(exc, "message", exc))) from None
        try:
            yield ModelVersions(db, store, settings)
        except (ServiceError, StoreError) as exc:
            raise click.ClickException(str(getattr(exc, "message", exc))) from None
    finally:
        db.dispose()


def _summary(version: dict) -> str:
    card = version.get("card") or {}
    metrics = card.get("validation") or {}
    ap, accuracy = metrics.get("ap"), metrics.get("accuracy")
    threshold = version.get("threshold")
    return "  ".join([
        "*" if version["active"] else " ", version["version"], (version.get("name") or "-").ljust(16),
        f"threshold {threshold:.4g}" if threshold is not None else "threshold default",
        f"val AP {100 * ap:.2f} %" if isinstance(ap, (int, float)) else "val AP n/a",
        f"acc {100 * accuracy:.2f} %" if isinstance(accuracy, (int, float)) else "acc n/a",
        version.get("created_at") or ""])


def register(cli: click.Group) -> None:
    @cli.group()
    def models() -> None:
        """Model versions: heads (and their cards) in BUCKET_MODELS; one is active, or the configured head."""

    @models.command("add")
    @click.argument("head", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--card", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                  help="its model card (default: HEAD.card.json beside it, when there is one)")
    @click.option("--name", default=None, help="a unique name for the version (letters, digits, . _ -)")
    @click.option("--activate", is_flag=True, help="make it the active version at once")
    @click.option("--json", "as_json", is_flag=True, help="print the version as JSON")
    def add(head: Path, card: Path | None, name: str | None, activate: bool, as_json: bool) -> None:
        """Store HEAD (the authors' plain state_dict) as a model version, checked against the configured backbone."""
        if card is None:
            beside = head.with_name(head.stem + ".card.json")
            card = beside if beside.is_file() else None
        try:
            card_data = parse_card(card.read_bytes()) if card is not None else None
        except ServiceError as exc:
            raise click.ClickException(f"{card}: {exc.message}") from None
        with _versions() as versions:
            version, created = versions.add(head.read_bytes(), card_data, name)
            if activate:
                versions.activate(version["version"], by="d3 models add")
                version["active"] = True
        if as_json:
            click.echo(json.dumps(version, indent=2))
            return
        what = "added" if created else "already stored; card/name updated" if card or name else "already stored"
        click.echo(f"{version['version']} {what} (from {head}{', card ' + str(card) if card else ''})")
        if version["active"]:
            click.echo("it is the active version: serving processes switch within MODEL_VERSION_POLL_S")
        else:
            click.echo(f"activate it with: d3 models activate {version['name'] or version['version']}")

    @models.command("list")
    @click.option("--json", "as_json", is_flag=True, help="print the versions as JSON")
    def list_versions(as_json: bool) -> None:
        """List the stored versions, newest first; * marks the active one."""
        with _versions() as versions:
            rows = versions.list()
            active = versions.active_record()
        if as_json:
            click.echo(json.dumps({"active": active["version"], "versions": rows}, indent=2))
            return
        for row in rows:
            click.echo(_summary(row))
        if active["version"] is None:
            click.echo("active: the configured head (D3_HEAD_WEIGHTS)")

    @models.command("activate")
    @click.argument("version", required=False)
    @click.option("--default", "to_default", is_flag=True, help="go back to the configured head (D3_HEAD_WEIGHTS)")
    def activate(version: str | None, to_default: bool) -> None:
        """Make VERSION (id, name or sha256 prefix) the one that answers; running processes follow."""
        if bool(version) == to_default:
            raise click.UsageError("give a VERSION or --default (not both)")
        with _versions() as versions:
            record = versions.activate(None if to_default else version, by="d3 models activate")
        target = record["version"] or "the configured head (D3_HEAD_WEIGHTS)"
        click.echo(f"active: {target}; serving processes switch within MODEL_VERSION_POLL_S")
