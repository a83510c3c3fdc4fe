"""Builds the proxy's hot path with mypyc: the modules every proxied request runs through
are compiled to C extensions (about a third fewer instructions per request; see the README's
"Performance"). Everything else, and these modules too with ZEITWORK_PURE_PYTHON=1, installs
as plain Python, which runs the same code.
"""

import os

from setuptools import Extension, setup

COMPILED = [
    "edge/proxy/client.py",
    "edge/proxy/upstream.py",
    "edge/proxy/http.py",
    "edge/proxy/worker.py",
    "edge/metrics.py",
]


def ext_modules() -> list[Extension]:
    if os.environ.get("ZEITWORK_PURE_PYTHON"):
        return []
    from mypyc.build import mypycify  # noqa: PLC0415  (only needed when compiling)

    # mypyc.ini: the build environment has none of the runtime dependencies, whose types do
    # not matter to the compiled code.
    return mypycify(["--config-file", "mypyc.ini", *COMPILED], group_name="zeitwork_hot")


setup(ext_modules=ext_modules())
