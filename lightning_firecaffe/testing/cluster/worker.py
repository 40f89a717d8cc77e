"""Rank runner for :meth:`EmulatedCluster.run`: ``python worker.py SPEC_PICKLE RESULT_PICKLE``.

Started by path (not ``-m``) and importing only the standard library, so that a rank does not pay for
``import lightning_firecaffe`` (which imports Lightning, ~5 s on 2 cores) unless its target needs it.
Targets inside ``lightning_firecaffe.testing.cluster`` are imported without running the top-level package's
``__init__`` (so no strategy registration there: import ``lightning_firecaffe`` yourself if you need it).

The spec holds the target (module, qualified name, script path when it lives in ``__main__``), the pickled
``(args, kwargs)``, the backend for ``init_process_group`` (None: none) and the run's timeout.  The result
file gets ``{"value": ...}`` or ``{"error": traceback, "exception": exc}``; the exit code is 0 or 1.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import time
import traceback
import types


def _import_target(module: str, qualname: str, main_path: str | None):
    if main_path:
        # like multiprocessing's spawn: load the script as __mp_main__ (its `if __name__ == "__main__"`
        # block does not run) and alias it as __main__ so pickles that refer to __main__ resolve
        spec = importlib.util.spec_from_file_location("__mp_main__", main_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["__mp_main__"] = mod
        sys.modules["__main__"] = mod
        spec.loader.exec_module(mod)
    else:
        if module.startswith("lightning_firecaffe.testing.cluster") and "lightning_firecaffe" not in sys.modules:
            pkg_spec = importlib.util.find_spec("lightning_firecaffe")
            if pkg_spec is not None and pkg_spec.submodule_search_locations:
                stub = types.ModuleType("lightning_firecaffe")
                stub.__path__ = list(pkg_spec.submodule_search_locations)
                stub.__spec__ = pkg_spec
                sys.modules["lightning_firecaffe"] = stub
        mod = importlib.import_module(module)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    dist = None
    try:
        fn = _import_target(spec["module"], spec["qualname"], spec.get("main_path"))
        args, kwargs = pickle.loads(spec["args"])
        if spec.get("backend"):
            from datetime import timedelta

            import torch.distributed as dist

            dist.init_process_group(spec["backend"], timeout=timedelta(seconds=max(spec["timeout"], 1.0)))
        payload = {"value": fn(*args, **kwargs)}
        code = 0
    except BaseException as exc:  # report everything, including SystemExit/KeyboardInterrupt from the target
        payload = {"error": traceback.format_exc(), "exception": exc, "failed_at": time.time()}
        code = 1
        print(payload["error"], file=sys.stderr, flush=True)
    finally:
        if dist is not None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    try:
        data = pickle.dumps(payload)
    except Exception as exc:
        if code == 0:
            payload, code = {"error": f"the return value cannot be pickled: {exc!r}"}, 1
        else:
            payload.pop("exception")
        data = pickle.dumps(payload)
    tmp = f"{result_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, result_path)
    return code


if __name__ == "__main__":
    sys.stdout.flush()
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: torch/gloo threads can hang it
