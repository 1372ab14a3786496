"""The `diffbank` command: thin click wrappers over the Python API; no logic lives here."""

from __future__ import annotations

import click

from diffbank import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diffbank")
def main() -> None:
    """Feature banks from text-free diffusion U-Nets, and the probes that read them.

    \b
    Typical flow:
      diffbank spec check cache_specs/cpu_small.yaml
      diffbank extract cache_specs/cpu_small.yaml --store runs/small.zarr
      diffbank probe sweep runs/small.zarr --out runs/small-probe
    """


def _register() -> None:
    # Each stage owns its commands; importing them here keeps this file free of logic.
    import importlib

    for module, names in [
        ("diffbank.commands.spec", ("spec",)),
        ("diffbank.commands.extract", ("extract", "store")),
        ("diffbank.commands.model", ("train", "sample")),
        ("diffbank.commands.probe", ("probe",)),
        ("diffbank.demo", ("demo",)),
    ]:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for name in names:
            cmd = getattr(mod, f"{name}_command", None)
            if cmd is not None:
                main.add_command(cmd, name)


_register()


if __name__ == "__main__":
    main()
