"""`d3 keys create|list|revoke`: API key administration from the command line."""

from __future__ import annotations

import json
from datetime import datetime

import click

from api.config import load_settings
from api.exceptions import ServiceError
from api.services.keys import KeyInfo, KeyService


def _service() -> KeyService:
    from api.database import Database, DatabaseUnavailable, SchemaNotMigrated

    settings = load_settings()
    db = Database(settings.resolved_database_url, settings.db_timeout_s)  # a database that hangs: a clear error
    try:
        db.require_migrated()
    except (DatabaseUnavailable, SchemaNotMigrated) as exc:
        raise click.ClickException(str(exc)) from None
    return KeyService(db)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def _row(key: KeyInfo) -> dict[str, object]:
    return {"id": key.id, "name": key.name, "admin": key.is_admin, "created_at": _when(key.created_at),
            "last_used_at": _when(key.last_used_at), "revoked_at": _when(key.revoked_at)}


def register(cli: click.Group) -> None:
    @cli.group()
    def keys() -> None:
        """API keys (stored only as hashes; a new key is printed once)."""

    @keys.command("create")
    @click.option("--name", required=True, help="Who or what uses the key (shown in listings and logs).")
    @click.option("--admin", is_flag=True, help="Admin keys see every client's predictions and /metrics.")
    def create(name: str, admin: bool) -> None:
        """Create a key and print it. It cannot be shown again: store it now."""
        try:
            info, plaintext = _service().create(name, admin)
        except ServiceError as exc:
            raise click.ClickException(exc.message) from None
        click.echo(plaintext)
        click.echo(f"created key {info.id} ({info.name}{', admin' if info.is_admin else ''}); "
                   "this is the only time it is shown", err=True)

    @keys.command("list")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
    def list_keys(as_json: bool) -> None:
        """List keys: id, name, admin, created, last used, revoked. Never the key itself."""
        try:
            rows = [_row(key) for key in _service().list()]
        except ServiceError as exc:
            raise click.ClickException(exc.message) from None
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        columns = ("id", "name", "admin", "created_at", "last_used_at", "revoked_at")
        widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
        click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
        for r in rows:
            click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip())

    @keys.command("revoke")
    @click.argument("key_id")
    def revoke(key_id: str) -> None:
        """Revoke a key by its id; requests with it get 401 from then on."""
        try:
            info = _service().revoke(key_id)
        except ServiceError as exc:
            raise click.ClickException(exc.message) from None
        click.echo(f"revoked key {info.id} ({info.name}) at {_when(info.revoked_at)}")
