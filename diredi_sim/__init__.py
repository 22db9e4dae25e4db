"""diredi-sim: DiReDi (distillation and reverse distillation for AIoT) in plain PyTorch.

This package never imports flwr or ray; the Flower glue lives in clients/ and server/.
"""


def _version() -> str:
    """The version has one source: `version` in pyproject.toml's [project] table, where Flower
    (`flwr run`) reads it too. An installed copy reports it from its metadata; a source tree that
    was never installed reads pyproject.toml itself."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diredi-sim")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        try:
            pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()
