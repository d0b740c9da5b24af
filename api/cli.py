"""The `d3` command: model commands (predict, eval, fetch-weights, info), database and key admin, the video
worker, deployment checks."""

from __future__ import annotations

import sys

import click

from api.config import ConfigError, load_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """D3 deepfake detector: command-line tools for the model and the service."""


@cli.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or migrate the database schema."""
    from api.database import upgrade_schema

    settings = load_settings()
    upgrade_schema(settings.resolved_database_url, revision)
    click.echo(f"database at {_masked_url(settings.resolved_database_url)} is at revision {revision}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision of the database and whether it is the newest."""
    from api.database import current_revision, head_revision

    url = load_settings().resolved_database_url
    current, head = current_revision(url), head_revision()
    click.echo(f"current: {current or 'none (empty database)'}  head: {head}")
    sys.exit(0 if current == head else 1)


@cli.command("check")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document")
@click.option("--only", default="", metavar="LIST", help="comma-separated checks to run (default: all)")
def check(as_json: bool, only: str) -> None:
    """Deployment checks of the app itself: settings, weights, inference tier, database, object store, queue.

    Exit 1 when any check FAILs. check_deployment.sh runs these beside its host checks.
    """
    import json

    from api.checks import CHECKS, report, run_checks, text_line

    names = [name.strip() for name in only.split(",") if name.strip()] or list(CHECKS)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise click.UsageError(f"unknown check: {', '.join(unknown)} (checks: {' '.join(CHECKS)})")
    results = run_checks(names)
    summary = report(results)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for result in results:
            click.echo(text_line(result))
        counts = summary["summary"]
        click.echo(f"summary: {counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail")
    sys.exit(0 if summary["ok"] else 1)


@cli.command("worker", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run video jobs from the queue (a Celery worker; same settings as the API). Extra arguments go to Celery."""
    import logging

    from api.context import build_services
    from api.request_log import use_json_logging

    settings = load_settings()
    if not settings.uses_celery:
        raise click.UsageError("no job queue configured: set CELERY_BROKER_URL or REDIS_URL "
                               "(without one, the API runs video jobs itself)")
    logging.basicConfig(level=settings.log_level)
    use_json_logging()
    services = build_services(settings)
    from api.worker import run_worker

    run_worker(services.video_jobs, services.job_runner, celery_args)


def _masked_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _register_command_groups() -> None:
    # Each concern owns its commands; they attach here.
    from api.services.keys_commands import register as register_key_commands

    register_key_commands(cli)
    from api.services.store_commands import register as register_store_commands

    register_store_commands(cli)
    from api.services.model_versions_commands import register as register_version_commands

    register_version_commands(cli)
    from api.detector.commands import register as register_model_commands

    register_model_commands(cli)
    from api.detector.training_commands import register as register_training_commands

    register_training_commands(cli)
    from api.detector.tier_commands import register as register_tier_commands
    from api.services.model_versions import catalog_from_settings

    register_tier_commands(cli, catalog_from_settings)  # the tier follows the active model version


_register_command_groups()


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
