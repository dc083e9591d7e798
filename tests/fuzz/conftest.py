"""Hypothesis profiles and the example counts.

PYKERNELS_FUZZ_PROFILE=ci (default; what `./dev.sh test` runs): a fixed,
derandomized set of examples per test, sized to a few minutes on 2 cores.
PYKERNELS_FUZZ_PROFILE=long (`./dev.sh fuzz`): many more examples, fresh random
ones each run. Either way the summary lists how many examples each op ran on each
backend, and PYKERNELS_FUZZ_COUNTS=<file> also writes them as JSON.
"""

import json
import os

from hypothesis import HealthCheck, Phase, settings

from .common import EXAMPLES, PROFILE

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
# No shrinking in CI: a failure is reported as drawn (with its reproduce blob), and the
# xfail(strict) tests of known defects do not spend minutes shrinking on every run.
settings.register_profile("ci", derandomize=True, phases=(Phase.explicit, Phase.reuse, Phase.generate), **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
settings.load_profile(PROFILE)


def pytest_terminal_summary(terminalreporter):
    if not EXAMPLES:
        return
    ops = sorted({op for op, _ in EXAMPLES})
    backends = [b for b in ("reference", "cpu", "triton", "cuda") if any(k[1] == b for k in EXAMPLES)]
    terminalreporter.section(f"fuzz examples per op and backend (profile {PROFILE})")
    terminalreporter.write_line(f"{'op':<34}" + "".join(f"{b:>11}" for b in backends))
    for op in ops:
        terminalreporter.write_line(f"{op:<34}" + "".join(f"{EXAMPLES.get((op, b), 0):>11}" for b in backends))
    path = os.environ.get("PYKERNELS_FUZZ_COUNTS")
    if path:
        with open(path, "w") as f:
            json.dump(
                {"profile": PROFILE, "examples": {f"{op} [{b}]": n for (op, b), n in sorted(EXAMPLES.items())}},
                f,
                indent=1,
            )
