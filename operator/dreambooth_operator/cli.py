"""The `dreambooth` command.

Subcommands that need torch (run, train, priors, export, serve) live in the trainer package and
are imported only when called, so the operator image (no torch) still has a working CLI.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from . import __version__

# name -> ("module:attribute" of a click command, imported on first use; its one-line help).
LAZY_COMMANDS = {
    "run": ("dreambooth_trainer.cli:run", "Run a DreamBoothJob locally: priors, train, export."),
    "train": ("dreambooth_trainer.cli:train", "Train (one torchrun rank) from a trainer config."),
    "priors": ("dreambooth_trainer.cli:priors", "Generate class-prior images (a shard)."),
    "export": ("dreambooth_trainer.cli:export", "Export the trained pipeline with a digest."),
    "evaluate": ("dreambooth_trainer.cli:evaluate", "Score the export and the base model."),
    "serve": ("dreambooth_trainer.serve.cli:serve", "Serve an exported pipeline over HTTP."),
    "operator": ("dreambooth_operator.handlers:operator_command", "Run the operator (kopf)."),
}


# The trainer's look at a job's local datasets (photos, captions, class images), as
# "module:attribute": where the trainer is not installed (the operator's image) `validate`
# checks the spec alone.
DATASET_CHECK = "dreambooth_trainer.dataset_check:local_dataset_problems"


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in LAZY_COMMANDS:
            return super().get_command(ctx, name)
        module_name, attribute = LAZY_COMMANDS[name][0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            missing = error.name or str(error)
            return _unavailable(name, f"needs {missing}: pip install 'dreambooth-operator[train]'")
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing lazy commands must not import torch just to print their one-line help.
        rows = [(n, c.get_short_help_str()) for n, c in sorted(self.commands.items())]
        rows += [(name, short_help) for name, (_, short_help) in LAZY_COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


def _unavailable(name: str, reason: str) -> click.Command:
    def fail() -> None:
        raise click.ClickException(f"`dreambooth {name}` {reason}")

    return click.Command(name, callback=fail, help=reason)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dreambooth")
def main() -> None:
    """DreamBooth fine-tuning of Stable Diffusion, on Kubernetes or locally."""


@main.command()
@click.argument("kind", type=click.Choice(["job", "server"]), default="job")
def crd(kind: str) -> None:
    """Print a CustomResourceDefinition, generated from the API models: DreamBoothJob (job, the
    default) or DreamBoothServer (server)."""
    from .crd import RESOURCES, crd_yaml

    click.echo(crd_yaml(RESOURCES[kind]), nl=False)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check DreamBoothJob and DreamBoothServer YAML files offline; every problem names its
    field. A job's local datasets (photos, captions, own class images) are checked too:
    listed, and each image decoded cheaply."""
    from dreambooth_contract.api import DreamBoothJob
    from dreambooth_contract.validation import JobInvalid, load_jobs

    failed = False
    for path in files:
        try:
            text = sys.stdin.read() if str(path) == "-" else path.read_text()
            jobs = load_jobs(text)
        except OSError as error:
            click.echo(f"{path}: cannot read: {error.strerror}", err=True)
            failed = True
            continue
        except JobInvalid as error:
            for problem in error.problems:
                click.echo(f"{path}: {problem}", err=True)
            failed = True
            continue
        base_dir = Path.cwd() if str(path) == "-" else path.resolve().parent
        for job in jobs:
            problems = dataset_problems(job, base_dir) if isinstance(job, DreamBoothJob) else []
            for problem in problems:
                click.echo(f"{path}: {problem}", err=True)
            failed = failed or bool(problems)
            if not problems:
                click.echo(f"{path}: ok: {job.kind} {job.metadata.name}")
    if failed:
        sys.exit(1)


def dataset_problems(job, base_dir: Path) -> list[str]:
    """What the trainer finds wrong with `job`'s local datasets; nothing without the trainer."""
    module_name, attribute = DATASET_CHECK.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    return getattr(module, attribute)(job, base_dir)


@main.command(
    "release-finalizers", short_help="Remove the operator's finalizer, for when none runs."
)
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    help="A namespace whose DreamBoothJobs to release (repeatable).",
)
@click.option(
    "-A", "--all-namespaces", is_flag=True, help="Release DreamBoothJobs in every namespace."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="Give up (exit 1) if the finalizer still comes back after this many seconds.",
)
@click.option("--dry-run", is_flag=True, help="Only list the jobs that carry the finalizer.")
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    help="Outside a pod: this kubeconfig rather than $KUBECONFIG or ~/.kube/config.",
)
def release_finalizers(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    timeout: float,
    dry_run: bool,
    kubeconfig: str | None,
) -> None:
    """Remove the operator's finalizer from DreamBoothJobs, for when no operator runs.

    kopf's finalizer (dreambooth.dev/finalizer) keeps a deleted job until the operator lets it
    go; with no operator (uninstalled, 0 replicas, namespace no longer watched) a delete hangs.
    This removes it and nothing else: jobs stay, and `kubectl delete dbj` then completes (their
    pods and other children are garbage-collected with them). The Helm chart runs it on
    `helm uninstall`. An operator that starts again puts the finalizer back.
    """
    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give --namespace (one or more) or --all-namespaces")
    from kubernetes import client

    from . import kube
    from .finalizers import FINALIZER, FinalizerKeptComingBack, release_until_settled

    kube.load_config(kubeconfig)
    where = "every namespace" if all_namespaces else ", ".join(namespaces)
    verb = "would release" if dry_run else "released"
    try:
        released = release_until_settled(
            client.CustomObjectsApi(),
            None if all_namespaces else namespaces,
            timeout=timeout,
            dry_run=dry_run,
            report=lambda key: click.echo(f"{verb} {FINALIZER} from DreamBoothJob {key}"),
        )
    except FinalizerKeptComingBack as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{verb} {len(released)} DreamBoothJob(s) in {where}")


if __name__ == "__main__":
    main()
