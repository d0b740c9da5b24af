"""`d3 store reconcile`: remove objects no row references, report rows whose object is gone."""

from __future__ import annotations

import json

import click

from api.config import load_settings


def register(cli: click.Group) -> None:
    @cli.group()
    def store() -> None:
        """The object store."""

    @store.command("reconcile")
    @click.option("--grace-s", type=float, default=None,
                  help="only remove objects older than this (default RECONCILE_GRACE_S)")
    @click.option("--dry-run", is_flag=True, help="report what would be removed, remove nothing")
    def reconcile_command(grace_s: float | None, dry_run: bool) -> None:
        """Delete objects without a row older than the grace period; report rows without an object.

        Exit status 0 when store and database agree afterwards, 1 when rows lost their object.
        """
        from api.database import Database, DatabaseUnavailable, SchemaNotMigrated
        from api.services.reconcile import reconcile
        from api.storage import StoreError, StoreUnavailable, make_object_store

        settings = load_settings()
        db = Database(settings.resolved_database_url, settings.db_timeout_s)
        try:
            db.require_migrated()
            store_ = make_object_store(settings, b"unused: no links are signed here")
            report = reconcile(db, store_, settings, settings.reconcile_grace_s if grace_s is None else grace_s,
                               dry_run=dry_run)
        except (DatabaseUnavailable, SchemaNotMigrated, StoreError, StoreUnavailable) as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            db.dispose()
        click.echo(json.dumps(report.as_dict(), indent=2))
        raise SystemExit(1 if report.rows_without_object else 0)
