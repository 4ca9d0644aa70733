"""Every command line juicecache starts, logged at exec time: no sampling, nothing missed.

Why not sample `ps`: `juicefs format` or the foreground part of `juicefs mount` can live
for less than any sampling interval, so a secret on their command line could go unseen.
Why not strace: `-f` stays attached to the daemons (JuiceFS mounts, Redis, SeaweedFS) and
never returns, and `--detach-on=execve` stops following at the first exec.

Instead, the commands under test run with a Python interpreter from a *shim venv*: a venv
(pyvenv.cfg, bin/python symlinked to the real interpreter, the real venv's site-packages)
whose bin/ also holds `juicefs`, `weed` and `redis-server` shims, and is first on PATH.
juicecache finds `juicefs` and `weed` beside `sys.executable` (else on PATH) and
`redis-server` on PATH, so every one of those it starts goes through a shim, which appends
its whole command line to the log in one write, then execs the real binary with the same
arguments: what `ps` shows at that moment. The Python processes the tests start are
logged by the caller (see `cluster.Machine`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

SHIMMED = ("juicefs", "weed", "redis-server")


def real_binary(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if os.access(beside, os.X_OK) else shutil.which(name)


class ExecLog:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "exec.log"
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        real_venv = Path(sys.prefix)
        (root / "pyvenv.cfg").write_text((real_venv / "pyvenv.cfg").read_text())
        os.symlink(os.path.realpath(sys.executable), bin_dir / "python")
        site = Path(sysconfig.get_paths()["purelib"])  # .venv/lib/pythonX.Y/site-packages
        (root / site.parent.relative_to(real_venv)).mkdir(parents=True)
        os.symlink(site, root / site.relative_to(real_venv))
        self.log.write_text("")
        for name in SHIMMED:
            real = real_binary(name)
            if real is None:
                continue
            shim = bin_dir / name
            shim.write_text(
                "#!/bin/sh\n"
                f'printf "%s\\n" "$0 $*" >> {shlex.quote(str(self.log))}\n'
                f'exec {shlex.quote(real)} "$@"\n'
            )
            shim.chmod(0o755)
        self.python = str(bin_dir / "python")

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with the shims first on PATH."""
        return {**env, "PATH": f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"}

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()
