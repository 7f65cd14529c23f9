"""The ``cascade`` command line. Each command is a thin wrapper over a library function."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="cascade",
    help="cascade-diffusion: train and serve cascaded text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Built-in datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command()
def figures(
    out: Path = typer.Option(Path("out/figures"), "--out", help="Folder for the PNG figures."),
    seed: int = typer.Option(0, help="Seed of every random draw, for reproducible figures."),
) -> None:
    """Draw the chapter's 1-D toy figures (18.2-18.8, 18.10) from the library's own functions."""
    from diffusion_core.figures import draw_all

    paths = draw_all(out, seed=seed)
    for p in paths:
        typer.echo(str(p))


@app.command()
def demo(
    out: Path = typer.Option(Path("out"), "--out", help="Folder for everything the demo writes."),
) -> None:
    """Run the whole pipeline on the built-in data (for now: the chapter's figures)."""
    figures(out=out / "figures", seed=0)


if __name__ == "__main__":  # pragma: no cover
    app()
