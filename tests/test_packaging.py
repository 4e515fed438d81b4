"""The distribution installs one top-level name, coft: a user's own `train` or `runtime` module never collides
with ours, and a box importing coft.runtime still gets no torch."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
import zipfile

from tests.support.runtime import ROOT

CHECK = """
import importlib.util, subprocess, sys
assert importlib.util.find_spec("coft") is not None
clashes = [name for name in ("train", "export", "runtime") if importlib.util.find_spec(name) is not None]
assert clashes == [], f"top-level modules installed: {clashes}"
import coft.runtime.pipeline, coft.runtime.comms.web, coft.runtime.model.bundle
assert "torch" not in sys.modules, "coft.runtime imported torch"
assert coft.runtime.pipeline.__file__.startswith(sys.prefix), coft.runtime.pipeline.__file__
version = subprocess.run([sys.prefix + "/bin/coft", "--version"], capture_output=True, text=True)
assert version.returncode == 0 and version.stdout.startswith("coft "), version
print("ok")
"""


def test_the_wheel_installs_only_coft_and_its_runtime_imports_no_torch(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("coft-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"coft", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    names = zipfile.ZipFile(wheel).namelist()
    assert {"coft/runtime/comms/web/static/index.html", "coft/runtime/comms/sparkplug/sparkplug_b.proto",
            "coft/runtime/engines/kernels/mahalanobis.cu", "coft/cli.py"} <= set(names)

    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(fresh)
    python = fresh / "bin/python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # the dependencies come from this environment's site-packages, after the fresh one's (no editable coft there:
    # a .pth only adds a path; the finder of the editable install is not run from it)
    fresh_site = next((fresh / "lib").glob("python*/site-packages"))
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    checked = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert checked.stdout.strip() == "ok", checked.stderr[-3000:]
