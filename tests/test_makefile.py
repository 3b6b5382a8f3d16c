"""The Makefile's install logic, run in a throw-away copy with a fake ``python3`` (``PY``): its
``-m venv`` makes a ``.venv`` whose ``pip`` only logs, so nothing is downloaded or installed."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

FAKE_PY = f"""#!/bin/sh
# fake python3: `-m venv [--clear] DIR` makes DIR/bin/python (the real one) and a pip that logs its call
echo "venv $*" >> calls.log
for dir; do :; done
case " $* " in *" --clear "*) rm -rf "$dir";; esac
mkdir -p "$dir/bin"
ln -sf {sys.executable} "$dir/bin/python"
printf '#!/bin/sh\\necho "pip $*" >> calls.log\\n' > "$dir/bin/pip"
chmod +x "$dir/bin/pip"
"""


@pytest.fixture
def checkout(tmp_path):
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy2(REPO / name, tmp_path / name)
    fake = tmp_path / "fake-python3"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    return tmp_path


def make(checkout: Path, *args: str) -> list[str]:
    """Run make in the copy; the venv and pip calls it made (one line each)."""
    log = checkout / "calls.log"
    log.unlink(missing_ok=True)
    subprocess.run(["make", "--no-print-directory", f"PY={checkout / 'fake-python3'}", *args], cwd=checkout,
                   check=True, capture_output=True, text=True)
    return log.read_text().splitlines() if log.exists() else []


def test_install_once_then_nothing_to_do(checkout):
    calls = make(checkout, "install")
    assert calls[0].startswith("venv -m venv") and "pip install -q torch==2.13.0" in calls
    assert (checkout / ".venv" / ".installed").exists()
    assert make(checkout, "install") == []  # idempotent: a working, stamped venv is left alone


@pytest.mark.parametrize("breakage", ["missing", "dangling"])
def test_a_broken_venv_behind_its_stamp_is_recreated(checkout, breakage):
    make(checkout, "install")
    python = checkout / ".venv" / "bin" / "python"
    python.unlink()
    if breakage == "dangling":  # the system python it pointed at was removed
        python.symlink_to(checkout / "gone" / "python3")
    calls = make(checkout, "install")
    assert calls[0] == "venv -m venv --clear .venv" and "pip install -q -c constraints.txt -e ." in calls
    subprocess.run([python, "-c", "import sys"], check=True)
    assert make(checkout, "install") == []


def test_torch_index_goes_to_the_torch_install_only(checkout):
    calls = make(checkout, "install", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    torch = [call for call in calls if "torch==" in call]
    assert torch == ["pip install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0"]
    assert sum("--index-url" in call for call in calls) == 1
