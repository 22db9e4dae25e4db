"""Packaging: one version source, the licence, the citation file, the classifiers and the lock."""
import configparser
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import diredi_sim

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUP = configparser.ConfigParser()
SETUP.read(ROOT / "setup.cfg")
LOCK = ROOT / "requirements.lock.txt"


def project_version() -> str:
    return PYPROJECT["project"]["version"]


def test_version_has_one_source():
    # Flower's `flwr run` needs a literal [project] version in pyproject.toml: that is the source.
    assert "version" not in PYPROJECT["project"].get("dynamic", [])
    assert "version" not in SETUP["metadata"]
    assert diredi_sim.__version__ == project_version()
    # The installed metadata agrees (stale after a version bump until `make` reinstalls).
    assert importlib.metadata.version("diredi-sim") == project_version()


def test_version_of_a_source_tree_that_was_never_installed():
    code = ("import importlib.metadata as m\n"
            "def missing(name): raise m.PackageNotFoundError(name)\n"
            "m.version = missing\n"
            "import diredi_sim; print(diredi_sim.__version__)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == project_version()


def test_flower_accepts_the_pyproject():
    from flwr.common.config import get_metadata_from_config, validate_config

    valid, errors, _ = validate_config(PYPROJECT, check_module=False)
    assert valid, errors
    assert get_metadata_from_config(PYPROJECT)[1] == project_version()


def test_license_is_the_full_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    for part in ("TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION", "9. Accepting Warranty or Additional Liability",
                 "END OF TERMS AND CONDITIONS", "APPENDIX: How to apply the Apache License to your work."):
        assert part in text, part
    assert len(text) == 11358  # the text of https://www.apache.org/licenses/LICENSE-2.0.txt, unchanged
    assert SETUP["metadata"]["license"] == "Apache-2.0"
    assert SETUP["metadata"]["license_files"].split() == ["LICENSE"]


def test_classifiers_name_every_supported_python():
    classifiers = SETUP["metadata"]["classifiers"].split("\n")
    assert SETUP["options"]["python_requires"] == ">=3.11"
    for minor in (11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # PEP 639: the licence is `license`


def test_citation_file():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == project_version()
    assert cff["license"] == SETUP["metadata"]["license"]
    assert cff["title"].startswith("diredi-sim") and cff["authors"]
    (paper,) = cff["references"]
    assert paper["title"] == "DiReDi: Distillation and Reverse Distillation for AIoT Applications"
    assert paper["year"] == 2024 and paper["url"] == "https://arxiv.org/abs/2409.08308"
    assert {"type": "doi", "value": "10.48550/arXiv.2409.08308"} in [
        {k: i[k] for k in ("type", "value")} for i in paper["identifiers"]]


def read_lock() -> list[tuple[Requirement, list[str]]]:
    """(requirement, hashes) for every entry of requirements.lock.txt."""
    entries = []
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())  # join continuation lines
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", line)
        requirement = Requirement(re.sub(r"\s*--hash=\S+", "", line))
        entries.append((requirement, hashes))
    return entries


def test_lock_pins_everything_with_hashes():
    entries = read_lock()
    assert len(entries) > 50
    for requirement, hashes in entries:
        assert re.fullmatch(r"==[^,*]+", str(requirement.specifier)), requirement  # exact pins only
        assert hashes, f"{requirement.name} has no hash"
    pins = {(canonicalize_name(r.name), str(r.specifier)) for r, _ in entries}
    for name, version in [("torch", "2.13.0"), ("torchvision", "0.28.0"), ("flwr", "1.41.0"), ("ray", "2.55.1")]:
        assert (name, f"=={version}") in pins, name
    # every dependency setup.cfg declares, dev extra included, is in the lock
    declared = SETUP["options"]["install_requires"].split() + SETUP["options.extras_require"]["dev"].split()
    locked = {name for name, _ in pins}
    for line in declared:
        assert canonicalize_name(Requirement(line).name) in locked, line


def test_environment_matches_the_lock():
    """What `make` installed is what the lock says, for this platform and Python."""
    mismatches = []
    for requirement, _ in read_lock():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        locked = str(requirement.specifier).removeprefix("==")
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != locked:
            mismatches.append(f"{requirement.name}: lock {locked}, installed {installed}")
    assert mismatches == [], "run `make env` to install the lock: " + "; ".join(mismatches)
