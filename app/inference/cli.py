"""`flask models ...`: build local model artifacts, e.g. from a container entrypoint before serving."""

from __future__ import annotations

from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

from app.inference.training import ARTIFACT, build_default_models, default_model_dir, default_model_exists

models_cli = AppGroup("models", help="Build and manage local model artifacts under MODELS_DIR.")


@models_cli.command("build-defaults")
@click.option("--if-missing", is_flag=True, help="Keep an existing build and exit 0 (for entrypoints).")
@click.option("--force", is_flag=True, help="Retrain and overwrite an existing build.")
def build_defaults(if_missing: bool, force: bool) -> None:
    """Train the default breast-cancer classifier into MODELS_DIR and print its sha256 and accuracy.

    Without a flag an existing build is an error, so a stale artifact is never reused by accident.
    """
    if if_missing and force:
        raise click.UsageError("--if-missing and --force are mutually exclusive.")
    models_dir = Path(current_app.config["MODELS_DIR"])
    artifact = default_model_dir(models_dir) / ARTIFACT
    exists = default_model_exists(models_dir)
    if exists and not (if_missing or force):
        raise click.ClickException(
            f"{artifact} already exists; pass --force to retrain or --if-missing to keep it."
        )
    metadata = build_default_models(models_dir, force=force)
    status = "kept" if exists and not force else "built"
    click.echo(
        f"{status} {artifact} sha256={metadata['sha256']} heldout_accuracy={metadata['heldout_accuracy']:.4f}"
    )
