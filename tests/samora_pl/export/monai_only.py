"""`python -I monai_only.py ARGS`: `python -m monai.bundle ARGS` in an interpreter that cannot import samora_pl.

A meta-path finder put first on `sys.meta_path` refuses samora_pl, data_modules and tests (whatever path or
editable install would provide them), and the checkout's folders leave `sys.path`. Before running the bundle
the script proves it: both imports must fail with the blocker's message. `--probe` only prints that proof.
At the end it prints the blocked packages found in `sys.modules` (none, or the test fails).
"""

import importlib.abc
import os
import runpy
import sys

BLOCKED = ("samora_pl", "data_modules", "tests")
MESSAGE = "blocked by monai_only.py"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is {MESSAGE}")
        return None


def blocked_imports() -> list:
    refused = []
    for name in ("samora_pl", "data_modules"):
        try:
            __import__(name)
        except ImportError as err:
            if MESSAGE in str(err):
                refused.append(name)
    return refused


def main() -> None:
    sys.meta_path.insert(0, Blocker())
    sys.path[:] = [p for p in sys.path if p and not os.path.abspath(p).startswith(CHECKOUT + os.sep + "src")]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p) != CHECKOUT]
    refused = blocked_imports()
    print(f"refused imports: {','.join(refused)}", flush=True)
    if refused != ["samora_pl", "data_modules"]:
        sys.exit(3)
    if sys.argv[1:] == ["--probe"]:
        return
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    print(f"blocked modules loaded: {len(loaded)} {loaded}", flush=True)


if __name__ == "__main__":
    main()
